"""CSI Controller service: dynamic provisioning through a StorageClass, with no state.

A "volume" is a view of the daemon's root, so there is nothing to create or delete. CreateVolume
checks its arguments and returns an id derived from the requested name alone (so a retried call gets
the same id) and a volume context naming the repository when the StorageClass gives one.
DeleteVolume always succeeds. ValidateVolumeCapabilities knows the ids CreateVolume gives
(`cvmfs-` and 32 hex digits) and answers NotFound for any other.

Limits of statelessness (documented in csi/README.md): capacity is not tracked (volumes report 0,
"unknown"), and a second CreateVolume with the same name but other parameters cannot be told apart
from a first one, so it does not get AlreadyExists.
"""

from __future__ import annotations

import grpc

from csi.proto import csi_pb2, csi_pb2_grpc
from csi.rpc import CsiError, invalid, rpc
from csi.volume import (
    capability_problem,
    check_name,
    check_volume_id,
    is_controller_volume_id,
    repository_from,
    volume_id_for,
)

RPC = csi_pb2.ControllerServiceCapability.RPC


def _check_capabilities(caps: list[csi_pb2.VolumeCapability]) -> str | None:
    if not caps:
        raise invalid("volume_capabilities is required")
    for cap in caps:
        problem = capability_problem(cap)
        if problem:
            return problem
    return None


class ControllerService(csi_pb2_grpc.ControllerServicer):
    @rpc
    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        cap = csi_pb2.ControllerServiceCapability(rpc=RPC(type=RPC.CREATE_DELETE_VOLUME))
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[cap])

    @rpc
    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        check_name(request.name)
        problem = _check_capabilities(list(request.volume_capabilities))
        if problem:
            raise invalid(problem)
        if request.HasField("capacity_range"):
            required = request.capacity_range.required_bytes
            limit = request.capacity_range.limit_bytes
            if required < 0 or limit < 0:
                raise invalid("capacity_range values must not be negative")
            if limit and required > limit:
                raise CsiError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    "capacity_range.required_bytes exceeds limit_bytes",
                )
        if request.HasField("volume_content_source"):
            raise invalid("volume_content_source is not supported (no snapshots, no clones)")
        source = repository_from(request.parameters, "parameters")
        context_out = source.context() if source else {}
        return csi_pb2.CreateVolumeResponse(
            volume=csi_pb2.Volume(
                volume_id=volume_id_for(request.name),
                capacity_bytes=0,  # unknown: a network filesystem shared by every volume
                volume_context=context_out,
            )
        )

    @rpc
    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise invalid("volume_id is required")
        return csi_pb2.DeleteVolumeResponse()  # nothing was created, nothing to delete

    @rpc
    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        check_volume_id(request.volume_id)
        problem = _check_capabilities(list(request.volume_capabilities))
        repository_from(request.volume_context, "volume_context")
        repository_from(request.parameters, "parameters")
        if not is_controller_volume_id(request.volume_id):
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"no volume {request.volume_id!r}")
        if problem:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=problem)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)
