"""The Node service: thin handlers over :class:`~csi.server.volumes.VolumeManager`.

Each handler checks the required fields in the spec's order (INVALID_ARGUMENT "<field> missing
in request"), then calls the manager, whose errors already carry their status codes.
"""

from __future__ import annotations

import grpc

from .capabilities import check_capability
from .errors import CsiError, missing
from .proto import csi_pb2 as pb
from .proto import csi_pb2_grpc as rpc
from .volumes import VolumeManager

NodeCap = pb.NodeServiceCapability.RPC
NODE_CAPABILITIES = (
    NodeCap.STAGE_UNSTAGE_VOLUME,
    NodeCap.GET_VOLUME_STATS,
    NodeCap.VOLUME_CONDITION,
)


class NodeService(rpc.NodeServicer):
    def __init__(self, manager: VolumeManager, node_id: str) -> None:
        self.manager = manager
        self.node_id = node_id

    def NodeStageVolume(
        self, request: pb.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeStageVolumeResponse:
        if not request.volume_id:
            raise missing("volume_id")
        if not request.staging_target_path:
            raise missing("staging_target_path")
        if not request.HasField("volume_capability"):
            raise missing("volume_capability")
        check_capability(request.volume_capability)
        self.manager.stage(
            request.volume_id, request.staging_target_path, dict(request.volume_context)
        )
        return pb.NodeStageVolumeResponse()

    def NodeUnstageVolume(
        self, request: pb.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeUnstageVolumeResponse:
        if not request.volume_id:
            raise missing("volume_id")
        if not request.staging_target_path:
            raise missing("staging_target_path")
        self.manager.unstage(request.volume_id, request.staging_target_path)
        return pb.NodeUnstageVolumeResponse()

    def NodePublishVolume(
        self, request: pb.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodePublishVolumeResponse:
        if not request.volume_id:
            raise missing("volume_id")
        if not request.target_path:
            raise missing("target_path")
        if not request.HasField("volume_capability"):
            raise missing("volume_capability")
        check_capability(request.volume_capability)
        self.manager.publish(
            request.volume_id,
            request.target_path,
            request.staging_target_path,
            dict(request.volume_context),
        )
        return pb.NodePublishVolumeResponse()

    def NodeUnpublishVolume(
        self, request: pb.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeUnpublishVolumeResponse:
        if not request.volume_id:
            raise missing("volume_id")
        if not request.target_path:
            raise missing("target_path")
        self.manager.unpublish(request.volume_id, request.target_path)
        return pb.NodeUnpublishVolumeResponse()

    def NodeGetVolumeStats(
        self, request: pb.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetVolumeStatsResponse:
        if not request.volume_id:
            raise missing("volume_id")
        if not request.volume_path:
            raise missing("volume_path")
        st = self.manager.stats(request.volume_id, request.volume_path)
        unit = pb.VolumeUsage
        return pb.NodeGetVolumeStatsResponse(
            usage=[
                unit(total=st.size.bytes, used=st.size.bytes, available=0, unit=unit.BYTES),
                unit(total=st.size.inodes, used=st.size.inodes, available=0, unit=unit.INODES),
            ],
            volume_condition=pb.VolumeCondition(abnormal=st.abnormal, message=st.message),
        )

    def NodeExpandVolume(
        self, request: pb.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeExpandVolumeResponse:
        raise CsiError(grpc.StatusCode.UNIMPLEMENTED, "composefs volumes cannot be expanded")

    def NodeGetCapabilities(
        self, request: pb.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetCapabilitiesResponse:
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[
                pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=t))
                for t in NODE_CAPABILITIES
            ]
        )

    def NodeGetInfo(
        self, request: pb.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(node_id=self.node_id)
