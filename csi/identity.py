"""CSI Identity service: plugin name and version, capabilities, readiness."""

from __future__ import annotations

import grpc
from google.protobuf import wrappers_pb2

import csi
from csi.config import PluginConfig
from csi.mounts import probe_root
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.rpc import rpc

Service = csi_pb2.PluginCapability.Service


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, config: PluginConfig) -> None:
        self.config = config

    @rpc
    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(
            name=self.config.driver_name,
            vendor_version=csi.__version__,
            manifest={"mode": self.config.mode, "cvmfs-root": self.config.cvmfs_root},
        )

    @rpc
    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = []
        if self.config.serves_controller:
            caps.append(csi_pb2.PluginCapability(service=Service(type=Service.CONTROLLER_SERVICE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    @rpc
    def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        """Ready when the daemon's root answers; a controller-only plugin is always ready."""
        if not self.config.serves_node:
            return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
        status = probe_root(self.config.cvmfs_root, self.config.probe_timeout)
        if not status.serving:
            context.set_details(f"{status.state.value}: {status.detail}")
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=status.serving))
