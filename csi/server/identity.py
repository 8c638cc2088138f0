"""The Identity service: name, version, capabilities, and a Probe of what the plugin needs."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence

import grpc
from google.protobuf import wrappers_pb2

from .errors import precondition
from .proto import csi_pb2 as pb
from .proto import csi_pb2_grpc as rpc

DRIVER_NAME = "csi.composefs.io"

#: A readiness check: returns None when fine, else the reason (a sentence).
Check = Callable[[], str | None]


def plugin_version() -> str:
    try:
        return importlib.metadata.version("composefs-csi")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


class IdentityService(rpc.IdentityServicer):
    def __init__(self, *, controller: bool, checks: Sequence[Check] = ()) -> None:
        self.controller = controller
        self.checks = list(checks)

    def GetPluginInfo(
        self, request: pb.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=plugin_version())

    def GetPluginCapabilities(
        self, request: pb.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.GetPluginCapabilitiesResponse:
        caps = []
        if self.controller:
            caps.append(
                pb.PluginCapability(
                    service=pb.PluginCapability.Service(
                        type=pb.PluginCapability.Service.CONTROLLER_SERVICE
                    )
                )
            )
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        problems = [p for p in (check() for check in self.checks) if p]
        if problems:
            raise precondition("; ".join(problems))
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
