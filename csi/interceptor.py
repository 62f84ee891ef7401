"""The one server interceptor: a log line per call with method, duration and status code.

The request is logged too, with every field the CSI spec marks `csi_secret` replaced, mount flags
replaced (the spec says they may be sensitive) and service account tokens in a volume context
replaced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import structlog
from google.protobuf import json_format
from google.protobuf.message import Message

from csi.proto import csi_pb2
from csi.volume import SECRET_CONTEXT_KEYS

log = structlog.get_logger("csi.grpc")
STRIPPED = "***stripped***"


def _is_secret(field: Any) -> bool:
    return bool(field.GetOptions().Extensions[csi_pb2.csi_secret])


def _is_repeated(field: Any) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5; `label` is gone in 7
    if repeated is not None:
        return bool(repeated)
    return bool(field.label == field.LABEL_REPEATED)


def _strip(msg: Message) -> None:
    for field, value in msg.ListFields():
        if _is_secret(field):
            for key in list(value):
                value[key] = STRIPPED
        elif field.name == "mount_flags":
            value[:] = [STRIPPED] * len(value)
        elif field.name == "volume_context":
            for key in SECRET_CONTEXT_KEYS & set(value):
                value[key] = STRIPPED
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if _is_repeated(field):
                for item in value:
                    _strip(item)
            else:
                _strip(value)


def redact(msg: Message) -> dict[str, Any]:
    """The request as a dict, safe to log."""
    try:
        copy = type(msg)()
        copy.CopyFrom(msg)
        _strip(copy)
        return json_format.MessageToDict(copy, preserving_proto_field_name=True)
    except Exception as e:  # logging must never fail a call (and never leak what it cannot strip)
        return {"unloggable": type(e).__name__}


class LoggingInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None:
            log.info("call", method=method, code="UNIMPLEMENTED", duration_ms=0.0)
            return None
        if handler.unary_unary is None:  # CSI has only unary calls
            return handler
        inner = handler.unary_unary

        def logged(request: Message, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            failed = False
            try:
                return inner(request, context)
            except BaseException:
                failed = True
                raise
            finally:
                code = context.code()
                if code is None:
                    code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
                details = context.details()
                if isinstance(details, bytes):
                    details = details.decode("utf-8", "replace")
                log.info(
                    "call",
                    method=method,
                    code=code.name,
                    duration_ms=round((time.monotonic() - start) * 1000, 3),
                    details=details or None,
                    request=redact(request),
                )

        return grpc.unary_unary_rpc_method_handler(
            logged,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
