"""The fake kubelet: the part of kubelet that matters to a CSI node plugin, played by the harness.

It creates what kubelet creates (the parent directories of targets and staging paths, with
``vol_data.json``), calls the node plugin on its Unix socket (the ``socket-dir`` hostPath) with
the requests kubelet sends, and runs pods whose CSI volumes it has published:

* inline ephemeral volumes: ``NodePublishVolume`` with volume id ``csi-<sha256(pod uid + volume
  name)>``, target ``<kubeletDir>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount``, the
  volume's attributes plus, when the CSIDriver says ``podInfoOnMount``, the pod's identity and
  ``csi.storage.k8s.io/ephemeral=true``;
* persistent volumes: ``NodeStageVolume`` at ``<kubeletDir>/plugins/kubernetes.io/csi/<driver>/
  <sha256(volume handle)>/globalmount`` (when the plugin has STAGE_UNSTAGE_VOLUME), then
  ``NodePublishVolume`` with that staging path; unstaged when the last pod using it goes.

What it does not do (docs/e2e.md): no API server, no node-driver-registrar (it finds the socket
by the chart's hostPath), no periodic republish (``requiresRepublish``): :attr:`calls` counts
every CSI call, so a scenario can show that a repair happened without one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi.server.proto import csi_pb2 as pb
from csi.server.proto import csi_pb2_grpc as rpc

from .node import FakeNode, PodRuntime, RunningPod
from .podspec import Doc, Pod

Mode = pb.VolumeCapability.AccessMode.Mode
#: PersistentVolume access modes as kubelet maps them to CSI.
ACCESS_MODES = {
    "ReadWriteOnce": Mode.SINGLE_NODE_WRITER,
    "ReadOnlyMany": Mode.MULTI_NODE_READER_ONLY,
    "ReadWriteMany": Mode.MULTI_NODE_MULTI_WRITER,
    "ReadWriteOncePod": Mode.SINGLE_NODE_SINGLE_WRITER,
}
RPC_TIMEOUT = 120  # about kubelet's


def capability(mode: int) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),  # type: ignore[arg-type]
    )


@dataclass
class PersistentVolume:
    """What the fake provisioner created (a PV object, in short)."""

    name: str
    handle: str
    attributes: dict[str, str]
    access_modes: list[str]
    read_only: bool = False


@dataclass
class PublishedVolume:
    volume: str  # the pod's volume name
    volume_id: str
    target: str  # node path
    host: Path
    staging: str = ""
    pv: PersistentVolume | None = None


@dataclass
class AppPod:
    running: RunningPod
    volumes: list[PublishedVolume] = field(default_factory=list)

    @property
    def pod(self) -> Pod:
        return self.running.pod


class FakeKubelet:
    def __init__(self, node: FakeNode, runtime: PodRuntime, socket: Path, csidriver: Doc) -> None:
        """``socket``: the plugin's socket as the host reaches it (the chart's socket-dir)."""
        self.node = node
        self.runtime = runtime
        self.driver = csidriver["metadata"]["name"]
        self.pod_info = bool(csidriver["spec"].get("podInfoOnMount"))
        self.socket = socket
        self.calls = 0
        #: Called between publishing a pod's volumes and starting its containers (a test hook).
        self.after_publish: Callable[[], None] | None = None
        self._channel: grpc.Channel | None = None
        self._staged: dict[str, tuple[str, int]] = {}  # handle -> (staging path, users)

    @property
    def kubelet_dir(self) -> str:
        return self.node.layout.kubelet_dir

    def _node(self) -> Any:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        return rpc.NodeStub(self._channel)

    def _call(self, method: str, request: Any) -> Any:
        self.calls += 1
        return getattr(self._node(), method)(request, timeout=RPC_TIMEOUT)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def wait_registered(self, timeout: float = 120) -> str:
        """Until the plugin's socket answers GetPluginInfo with the CSIDriver's name and Probe
        says ready (what node-driver-registrar and kubelet wait for). Returns its version."""
        self.close()
        deadline = time.monotonic() + timeout
        last = "no socket"
        while time.monotonic() < deadline:
            if self.socket.exists():
                with grpc.insecure_channel(f"unix://{self.socket}") as ch:
                    ident = rpc.IdentityStub(ch)
                    try:
                        info = ident.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=5)
                        ready = ident.Probe(pb.ProbeRequest(), timeout=5)
                    except grpc.RpcError as e:
                        last = f"{e.code().name}: {e.details()}"
                    else:
                        if info.name != self.driver:
                            raise RuntimeError(f"plugin says it is {info.name}, not {self.driver}")
                        if not ready.HasField("ready") or ready.ready.value:
                            return str(info.vendor_version)
                        last = "Probe: not ready"
            time.sleep(0.2)
        raise TimeoutError(f"node plugin not registered after {timeout:.0f} s ({last})")

    def probe(self) -> tuple[bool, str]:
        """What the livenessprobe sidecar asks (Identity.Probe)."""
        with grpc.insecure_channel(f"unix://{self.socket}") as ch:
            try:
                r = rpc.IdentityStub(ch).Probe(pb.ProbeRequest(), timeout=5)
            except grpc.RpcError as e:
                return False, f"{e.code().name}: {e.details()}"
        return (not r.HasField("ready") or r.ready.value), ""

    def stages(self) -> bool:
        caps = self._call("NodeGetCapabilities", pb.NodeGetCapabilitiesRequest())
        kinds = {c.rpc.type for c in caps.capabilities}
        return pb.NodeServiceCapability.RPC.STAGE_UNSTAGE_VOLUME in kinds

    # -- volumes ----------------------------------------------------------------------------

    def _pod_context(self, pod: Pod, ephemeral: bool) -> dict[str, str]:
        if not self.pod_info:
            return {}
        return {
            "csi.storage.k8s.io/pod.name": pod.name,
            "csi.storage.k8s.io/pod.namespace": pod.namespace,
            "csi.storage.k8s.io/pod.uid": pod.uid,
            "csi.storage.k8s.io/serviceAccount.name": pod.spec.get("serviceAccountName", "default"),
            "csi.storage.k8s.io/ephemeral": "true" if ephemeral else "false",
        }

    def _target(self, pod: Pod, volume: str, volume_id: str, extra: dict[str, Any]) -> str:
        target = f"{self.kubelet_dir}/pods/{pod.uid}/volumes/kubernetes.io~csi/{volume}/mount"
        parent = self.node.host(target).parent
        parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        data = {"driverName": self.driver, "volumeHandle": volume_id, **extra}
        (parent / "vol_data.json").write_text(json.dumps(data))
        return target

    def publish_inline(self, pod: Pod, vol: Doc) -> PublishedVolume:
        src = vol["csi"]
        if src["driver"] != self.driver:
            raise ValueError(f"volume {vol['name']}: driver {src['driver']} is not ours")
        volume_id = "csi-" + hashlib.sha256((pod.uid + vol["name"]).encode()).hexdigest()
        target = self._target(pod, vol["name"], volume_id, {"volumeLifecycleMode": "Ephemeral"})
        context = {**(src.get("volumeAttributes") or {}), **self._pod_context(pod, True)}
        self._call(
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(
                volume_id=volume_id,
                target_path=target,
                volume_capability=capability(Mode.SINGLE_NODE_WRITER),
                readonly=bool(src.get("readOnly")),
                volume_context=context,
            ),
        )
        return PublishedVolume(vol["name"], volume_id, target, self.node.host(target))

    def publish_persistent(self, pod: Pod, vol: Doc, pv: PersistentVolume) -> PublishedVolume:
        mode = ACCESS_MODES[pv.access_modes[0]]
        staging = ""
        if self.stages():
            staging, users = self._staged.get(pv.handle, ("", 0))
            if not staging:
                digest = hashlib.sha256(pv.handle.encode()).hexdigest()
                plugin_dir = f"{self.kubelet_dir}/plugins/kubernetes.io/csi/{self.driver}"
                staging = f"{plugin_dir}/{digest}/globalmount"
                parent = self.node.host(staging).parent
                parent.mkdir(mode=0o750, parents=True, exist_ok=True)
                (parent / "vol_data.json").write_text(
                    json.dumps({"driverName": self.driver, "volumeHandle": pv.handle})
                )
                self._call(
                    "NodeStageVolume",
                    pb.NodeStageVolumeRequest(
                        volume_id=pv.handle,
                        staging_target_path=staging,
                        volume_capability=capability(mode),
                        volume_context=pv.attributes,
                    ),
                )
            self._staged[pv.handle] = (staging, users + 1)
        target = self._target(
            pod, pv.name, pv.handle, {"volumeLifecycleMode": "Persistent", "specVolID": pv.name}
        )
        read_only = pv.read_only or bool(vol["persistentVolumeClaim"].get("readOnly"))
        self._call(
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(
                volume_id=pv.handle,
                target_path=target,
                staging_target_path=staging,
                volume_capability=capability(mode),
                readonly=read_only,
                volume_context={**pv.attributes, **self._pod_context(pod, False)},
            ),
        )
        return PublishedVolume(vol["name"], pv.handle, target, self.node.host(target), staging, pv)

    def unpublish(self, v: PublishedVolume) -> None:
        self._call(
            "NodeUnpublishVolume",
            pb.NodeUnpublishVolumeRequest(volume_id=v.volume_id, target_path=v.target),
        )
        if v.pv is not None and v.staging:
            staging, users = self._staged[v.pv.handle]
            if users > 1:
                self._staged[v.pv.handle] = (staging, users - 1)
                return
            self._call(
                "NodeUnstageVolume",
                pb.NodeUnstageVolumeRequest(volume_id=v.pv.handle, staging_target_path=staging),
            )
            del self._staged[v.pv.handle]

    # -- pods -------------------------------------------------------------------------------

    def run_pod(
        self,
        pod: Pod,
        configmaps: dict[str, dict[str, str]],
        claims: dict[str, PersistentVolume] | None = None,
    ) -> AppPod:
        """Publish the pod's CSI volumes, then start its containers."""
        published: list[PublishedVolume] = []
        for vol in pod.spec.get("volumes") or []:
            if "csi" in vol:
                published.append(self.publish_inline(pod, vol))
            elif "persistentVolumeClaim" in vol:
                pv = (claims or {})[vol["persistentVolumeClaim"]["claimName"]]
                published.append(self.publish_persistent(pod, vol, pv))
        if self.after_publish is not None:
            self.after_publish()
        plan = self.runtime.plan(pod, configmaps, {v.volume: v.host for v in published})
        return AppPod(self.runtime.start(plan), published)

    def delete_pod(self, app: AppPod, *, grace: int | None = None) -> None:
        """Stop the containers, unpublish (and unstage) the volumes, remove the pod."""
        self.runtime.delete(app.running, grace=grace)
        for v in app.volumes:
            self.unpublish(v)
        self.runtime.finish(app.running)
