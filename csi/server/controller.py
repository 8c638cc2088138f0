"""The Controller service: thin handlers over :class:`~csi.server.provisioner.Provisioner`."""

from __future__ import annotations

import grpc

from .capabilities import check_capability, only_readers
from .errors import CsiError, invalid, missing
from .proto import csi_pb2 as pb
from .proto import csi_pb2_grpc as rpc
from .provisioner import Provisioner

ControllerCap = pb.ControllerServiceCapability.RPC


class ControllerService(rpc.ControllerServicer):
    def __init__(self, provisioner: Provisioner) -> None:
        self.provisioner = provisioner

    def CreateVolume(
        self, request: pb.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> pb.CreateVolumeResponse:
        if not request.name:
            raise missing("name")
        if not request.volume_capabilities:
            raise missing("volume_capabilities")
        for i, cap in enumerate(request.volume_capabilities):
            check_capability(cap, f"volume_capabilities[{i}]")
        if request.HasField("volume_content_source"):
            raise invalid("volume_content_source: composefs volumes are made from images only")
        prov = self.provisioner.create(
            request.name,
            dict(request.parameters),
            request.capacity_range.required_bytes,
            request.capacity_range.limit_bytes,
        )
        return pb.CreateVolumeResponse(
            volume=pb.Volume(
                volume_id=prov.volume_id,
                capacity_bytes=prov.capacity,
                volume_context=prov.context,
            )
        )

    def DeleteVolume(
        self, request: pb.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> pb.DeleteVolumeResponse:
        if not request.volume_id:
            raise missing("volume_id")
        self.provisioner.delete(request.volume_id)
        return pb.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: pb.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise missing("volume_id")
        if not request.volume_capabilities:
            raise missing("volume_capabilities")
        for i, cap in enumerate(request.volume_capabilities):
            if not cap.HasField("access_mode"):
                raise missing(f"volume_capabilities[{i}].access_mode")
        self.provisioner.spec(request.volume_id, dict(request.volume_context))
        why = only_readers(request.volume_capabilities)
        if why is not None:
            return pb.ValidateVolumeCapabilitiesResponse(message=why)
        return pb.ValidateVolumeCapabilitiesResponse(
            confirmed=pb.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=dict(request.volume_context),
                volume_capabilities=list(request.volume_capabilities),
                parameters=dict(request.parameters),
            )
        )

    def ListVolumes(
        self, request: pb.ListVolumesRequest, context: grpc.ServicerContext
    ) -> pb.ListVolumesResponse:
        raise CsiError(grpc.StatusCode.UNIMPLEMENTED, "ListVolumes is not supported")

    def GetCapacity(
        self, request: pb.GetCapacityRequest, context: grpc.ServicerContext
    ) -> pb.GetCapacityResponse:
        raise CsiError(grpc.StatusCode.UNIMPLEMENTED, "GetCapacity is not supported")

    def ControllerGetCapabilities(
        self, request: pb.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ControllerGetCapabilitiesResponse:
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[
                pb.ControllerServiceCapability(
                    rpc=pb.ControllerServiceCapability.RPC(type=ControllerCap.CREATE_DELETE_VOLUME)
                )
            ]
        )
