"""The controller over its real Unix socket, and the persistent-volume flow through the node
plugin: CreateVolume -> NodeStage -> NodePublish -> NodeUnpublish -> NodeUnstage -> DeleteVolume.
The PVC-annotation path is tested against a FAKE Kubernetes API server (a small HTTP server
answering GET /api/v1/namespaces/NS/persistentvolumeclaims/NAME)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.server import build_controller
from csi.server.imageinfo import measure
from csi.server.k8s import PVCAnnotations
from csi.server.proto import csi_pb2 as pb
from tests._serverkit import MOUNT_CAP, RepoImage, Stubs, code_of, driver_config, make_repo

INVALID = grpc.StatusCode.INVALID_ARGUMENT
Mode = pb.VolumeCapability.AccessMode


def cap(mode: int) -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=Mode(mode=mode))


class FakeKubernetesAPI:
    """A fake API server: serves PVCs from a dict, records requests, 404 otherwise."""

    def __init__(self) -> None:
        self.pvcs: dict[tuple[str, str], dict[str, str]] = {}
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append(self.path)
                parts = self.path.split("?")[0].strip("/").split("/")
                if (
                    len(parts) == 6
                    and parts[:3] == ["api", "v1", "namespaces"]
                    and parts[4] == "persistentvolumeclaims"
                    and (parts[3], parts[5]) in fake.pvcs
                ):
                    body: dict[str, Any] = {
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "metadata": {
                            "name": parts[5],
                            "namespace": parts[3],
                            "annotations": fake.pvcs[(parts[3], parts[5])],
                        },
                        "spec": {"accessModes": ["ReadOnlyMany"]},
                    }
                    status = 200
                else:
                    body = {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "reason": "NotFound",
                        "code": 404,
                    }
                    status = 404
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RepoImage]]:
    root = tmp_path_factory.mktemp("repo")
    return root / "repo", make_repo(root, 3, seed0=2000)


class Controller:
    def __init__(self, work: Path, repo: Path) -> None:
        self.api = FakeKubernetesAPI()
        repos = {"local": str(repo), "down": "http://127.0.0.1:9/"}
        self.config, _ = driver_config(work, repos)
        self.socket = work / "ctrl" / "csi.sock"
        self.plugin = build_controller(
            self.config,
            f"unix://{self.socket}",
            annotations=PVCAnnotations.for_host(self.api.url),
            state_path=work / "ctrl" / "state.db",
        )
        self.stubs = Stubs(self.socket)

    def close(self) -> None:
        self.stubs.close()
        self.plugin.stop()
        self.api.close()


@pytest.fixture
def ctrl(tmp_path: Path, images: tuple[Path, list[RepoImage]]) -> Iterator[Controller]:
    c = Controller(tmp_path, images[0])
    try:
        yield c
    finally:
        c.close()


def create(name: str, params: dict[str, str], **kw: Any) -> pb.CreateVolumeRequest:
    return pb.CreateVolumeRequest(
        name=name, parameters=params, volume_capabilities=[cap(Mode.MULTI_NODE_READER_ONLY)], **kw
    )


def test_identity_advertises_the_controller(ctrl: Controller) -> None:
    caps = ctrl.stubs.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    kinds = {c.service.type for c in caps.capabilities}
    assert kinds == {pb.PluginCapability.Service.CONTROLLER_SERVICE}
    assert ctrl.stubs.identity.Probe(pb.ProbeRequest()).ready.value is True
    ccaps = ctrl.stubs.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    rpc = pb.ControllerServiceCapability.RPC
    assert [c.rpc.type for c in ccaps.capabilities] == [rpc.CREATE_DELETE_VOLUME]


def test_create_pins_refs_and_is_idempotent(
    ctrl: Controller, images: tuple[Path, list[RepoImage]]
) -> None:
    img = images[1][0]
    c = ctrl.stubs.controller
    params = {"image": img.name, "repository": "local"}
    first = c.CreateVolume(create("pvc-1", params))
    again = c.CreateVolume(create("pvc-1", params))
    assert first == again
    vol = first.volume
    assert vol.volume_id.startswith("cfs1:") and len(vol.volume_id) <= 128
    assert vol.volume_context["image"] == img.ref  # pinned
    assert vol.volume_context["repository"] == "local"
    size = measure(Path(images[0]) / "images" / img.digest.hex())
    assert vol.capacity_bytes == size.bytes
    # another name: another id (kubelet must never see two PVs with one handle)
    other = c.CreateVolume(create("pvc-2", params)).volume
    assert other.volume_id != vol.volume_id
    # the same name with other parameters, or a capacity it cannot satisfy
    assert code_of(c.CreateVolume, create("pvc-1", {**params, "fetch": "lazy"})) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    bigger = pb.CapacityRange(required_bytes=vol.capacity_bytes * 2)
    assert code_of(c.CreateVolume, create("pvc-1", params, capacity_range=bigger)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    # a request above the image's size is granted with capacity = the request
    big = c.CreateVolume(create("pvc-3", params, capacity_range=bigger)).volume
    assert big.capacity_bytes == vol.capacity_bytes * 2
    small = pb.CapacityRange(limit_bytes=max(1, vol.capacity_bytes // 2))
    assert code_of(c.CreateVolume, create("pvc-4", params, capacity_range=small)) == (
        grpc.StatusCode.OUT_OF_RANGE
    )
    for _ in range(2):
        c.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    # after deletion the name is free for other parameters
    c.CreateVolume(create("pvc-1", {**params, "fetch": "lazy"}))


def test_controller_errors(ctrl: Controller, images: tuple[Path, list[RepoImage]]) -> None:
    img = images[1][0]
    c = ctrl.stubs.controller
    good = {"image": img.name}
    cases: list[tuple[Any, Any, grpc.StatusCode]] = [
        (
            c.CreateVolume,
            pb.CreateVolumeRequest(parameters=good, volume_capabilities=[MOUNT_CAP]),
            INVALID,
        ),
        (c.CreateVolume, pb.CreateVolumeRequest(name="n", parameters=good), INVALID),
        (c.CreateVolume, create("n", {}), INVALID),
        (c.CreateVolume, create("n", {**good, "bogus": "1"}), INVALID),
        (c.CreateVolume, create("n", {**good, "repository": "elsewhere"}), INVALID),
        (c.CreateVolume, create("n", {"image": "missing:v1"}), grpc.StatusCode.NOT_FOUND),
        (c.CreateVolume, create("n", {"image": "sha256:" + "cd" * 32}), grpc.StatusCode.NOT_FOUND),
        (c.CreateVolume, create("n", {**good, "repository": "down"}), grpc.StatusCode.UNAVAILABLE),
        (
            c.CreateVolume,
            create(
                "n",
                good,
                volume_content_source=pb.VolumeContentSource(
                    snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id="s")
                ),
            ),
            INVALID,
        ),
        (c.DeleteVolume, pb.DeleteVolumeRequest(), INVALID),
        (c.DeleteVolume, pb.DeleteVolumeRequest(volume_id="no-such-volume"), grpc.StatusCode.OK),
        (
            c.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[MOUNT_CAP]),
            INVALID,
        ),
        (
            c.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(volume_id="cfs1:x"),
            INVALID,
        ),
        (
            c.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id="some-vol-id", volume_capabilities=[MOUNT_CAP]
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
        (c.ListVolumes, pb.ListVolumesRequest(), grpc.StatusCode.UNIMPLEMENTED),
        (c.GetCapacity, pb.GetCapacityRequest(), grpc.StatusCode.UNIMPLEMENTED),
    ]
    for fn, req, want in cases:
        for _ in range(2):
            assert code_of(fn, req) == want, req


def test_validate_confirms_reader_modes_only(
    ctrl: Controller, images: tuple[Path, list[RepoImage]]
) -> None:
    c = ctrl.stubs.controller
    vol = c.CreateVolume(create("pvc-v", {"image": images[1][1].name})).volume
    for mode in (Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY):
        res = c.ValidateVolumeCapabilities(
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id=vol.volume_id, volume_capabilities=[cap(mode)]
            )
        )
        assert res.HasField("confirmed")
    for mode in (Mode.SINGLE_NODE_WRITER, Mode.MULTI_NODE_MULTI_WRITER):
        res = c.ValidateVolumeCapabilities(
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id=vol.volume_id, volume_capabilities=[cap(mode)]
            )
        )
        assert not res.HasField("confirmed")
        assert "read-only" in res.message


def test_many_layers_use_a_hashed_id(
    ctrl: Controller, images: tuple[Path, list[RepoImage]]
) -> None:
    names = [i.name for i in images[1]]
    vol = ctrl.stubs.controller.CreateVolume(create("pvc-l", {"layers": ",".join(names)})).volume
    assert vol.volume_id.startswith("cfs1h:") and len(vol.volume_id) <= 128
    assert vol.volume_context["layers"] == ",".join(i.ref for i in images[1])
    res = ctrl.stubs.controller.ValidateVolumeCapabilities(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id,
            volume_context=vol.volume_context,
            volume_capabilities=[cap(Mode.MULTI_NODE_READER_ONLY)],
        )
    )
    assert res.HasField("confirmed")
    # the id does not match a tampered context
    tampered = {**vol.volume_context, "layers": images[1][0].ref}
    assert (
        code_of(
            ctrl.stubs.controller.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id=vol.volume_id,
                volume_context=tampered,
                volume_capabilities=[cap(Mode.MULTI_NODE_READER_ONLY)],
            ),
        )
        == grpc.StatusCode.NOT_FOUND
    )


def test_image_from_pvc_annotation(ctrl: Controller, images: tuple[Path, list[RepoImage]]) -> None:
    img = images[1][2]
    ctrl.api.pvcs[("team-a", "model")] = {"composefs.io/image": img.name}
    ctrl.api.pvcs[("team-a", "bare")] = {}
    sc = {"imageFromPVCAnnotation": "true", "repository": "local"}
    meta = {
        "csi.storage.k8s.io/pvc/name": "model",
        "csi.storage.k8s.io/pvc/namespace": "team-a",
        "csi.storage.k8s.io/pv/name": "pvc-123",
    }
    vol = ctrl.stubs.controller.CreateVolume(create("pvc-123", {**sc, **meta})).volume
    assert vol.volume_context["image"] == img.ref
    assert "/api/v1/namespaces/team-a/persistentvolumeclaims/model" in ctrl.api.requests
    c = ctrl.stubs.controller
    no_meta = create("pvc-9", sc)
    assert code_of(c.CreateVolume, no_meta) == INVALID  # needs --extra-create-metadata
    unknown = create("pvc-9", {**sc, **meta, "csi.storage.k8s.io/pvc/name": "nope"})
    assert code_of(c.CreateVolume, unknown) == grpc.StatusCode.NOT_FOUND
    bare = create("pvc-9", {**sc, **meta, "csi.storage.k8s.io/pvc/name": "bare"})
    assert code_of(c.CreateVolume, bare) == INVALID


def test_controller_state_survives_restart(
    tmp_path: Path, images: tuple[Path, list[RepoImage]]
) -> None:
    c1 = Controller(tmp_path, images[0])
    params = {"image": images[1][0].name}
    try:
        vol = c1.stubs.controller.CreateVolume(create("pvc-r", params)).volume
    finally:
        c1.close()
    c2 = Controller(tmp_path, images[0])
    try:
        assert code_of(
            c2.stubs.controller.CreateVolume, create("pvc-r", {**params, "fetch": "lazy"})
        ) == (grpc.StatusCode.ALREADY_EXISTS)
        assert c2.stubs.controller.CreateVolume(create("pvc-r", params)).volume == vol
    finally:
        c2.close()
