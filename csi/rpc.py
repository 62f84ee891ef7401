"""RPC plumbing shared by the services: the error type and the decorator that maps it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import structlog

log = structlog.get_logger("csi.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class CsiError(Exception):
    """An RPC failure with its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def rpc(
    method: Callable[[Any, Req, grpc.ServicerContext], Resp],
) -> Callable[[Any, Req, grpc.ServicerContext], Resp]:
    """Turn CsiError into its status; any other exception into INTERNAL (and log it)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Req, context: grpc.ServicerContext) -> Resp:
        try:
            return method(self, request, context)
        except CsiError as e:
            context.abort(e.code, e.message)
        except Exception as e:
            log.exception("unexpected error", method=method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        raise AssertionError("context.abort returned")  # pragma: no cover

    return wrapper
