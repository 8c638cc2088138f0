"""The fake csi-provisioner: what the external-provisioner sidecar (which cannot be pulled here)
asks the controller for a PersistentVolumeClaim of a StorageClass, on the controller's socket
(its ``socket-dir`` emptyDir)."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc

from csi.server.proto import csi_pb2 as pb
from csi.server.proto import csi_pb2_grpc as rpc

from .kubelet import ACCESS_MODES, PersistentVolume, capability
from .podspec import Doc


class FakeProvisioner:
    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def _stub(self, ch: grpc.Channel) -> rpc.ControllerStub:
        return rpc.ControllerStub(ch)

    def create(
        self, storage_class: Doc, *, access_mode: str = "ReadOnlyMany", size: int = 1 << 30
    ) -> PersistentVolume:
        """CreateVolume for a new claim, as csi-provisioner names it (``pvc-<claim uid>``)."""
        name = f"pvc-{uuid.uuid4()}"
        params = {str(k): str(v) for k, v in (storage_class.get("parameters") or {}).items()}
        with grpc.insecure_channel(f"unix://{self.socket}") as ch:
            reply = self._stub(ch).CreateVolume(
                pb.CreateVolumeRequest(
                    name=name,
                    capacity_range=pb.CapacityRange(required_bytes=size),
                    volume_capabilities=[capability(ACCESS_MODES[access_mode])],
                    parameters=params,
                ),
                timeout=120,
            )
        vol = reply.volume
        return PersistentVolume(
            name=name,
            handle=vol.volume_id,
            attributes=dict(vol.volume_context),
            access_modes=[access_mode],
        )

    def delete(self, pv: PersistentVolume) -> None:
        with grpc.insecure_channel(f"unix://{self.socket}") as ch:
            self._stub(ch).DeleteVolume(pb.DeleteVolumeRequest(volume_id=pv.handle), timeout=120)

    def wait_ready(self, timeout: float = 120) -> None:
        import time

        deadline = time.monotonic() + timeout
        last = "no socket"
        while time.monotonic() < deadline:
            if self.socket.exists():
                with grpc.insecure_channel(f"unix://{self.socket}") as ch:
                    try:
                        rpc.IdentityStub(ch).GetPluginInfo(pb.GetPluginInfoRequest(), timeout=5)
                        return
                    except grpc.RpcError as e:
                        last = f"{e.code().name}: {e.details()}"
            time.sleep(0.2)
        raise TimeoutError(f"controller not answering after {timeout:.0f} s ({last})")
