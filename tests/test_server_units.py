"""Unit tests of the CSI server's plain parts: attributes, volume ids, redaction, mount-table
parsing, fetch jobs, locks, error mapping. No root needed."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi.fetch.errors import (
    AccessDenied,
    Corrupt,
    InvalidReference,
    NoSpace,
    NotFound,
    TimedOut,
    Unreachable,
)
from csi.fetch.progress import FetchProgress
from csi.server import attributes as a
from csi.server import volumeid
from csi.server.errors import CsiError, to_csi_error
from csi.server.fetcher import FetchJobs
from csi.server.interceptor import CsiInterceptor
from csi.server.locks import KeyedLocks
from csi.server.metrics import parse_address
from csi.server.mounts import parse_mountinfo
from csi.server.proto import csi_pb2 as pb
from csi.server.redact import STRIPPED, redacted
from csi.store.errors import StoreFull

D1 = bytes(range(32))
D2 = bytes(range(32, 64))


def code(fn: Any, *args: Any) -> grpc.StatusCode:
    try:
        fn(*args)
    except CsiError as e:
        return e.code
    return grpc.StatusCode.OK


# -- attributes ---------------------------------------------------------------------------


def test_volume_attributes() -> None:
    s = a.parse_volume_attributes(
        {"image": "llama-3-8b:v2", "csi.storage.k8s.io/pod.name": "x", "fetch": "lazy"}
    )
    assert s == a.VolumeSpec(refs=("llama-3-8b:v2",), repository=None, lazy=True)
    s = a.parse_volume_attributes({"layers": "base:1, patch:3", "repository": "models"})
    assert s.refs == ("base:1", "patch:3") and s.repository == "models" and not s.lazy
    # other people's prefixed keys are ignored
    a.parse_volume_attributes({"image": "x", "storage.kubernetes.io/csiProvisionerIdentity": "1"})


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"image": "a", "layers": "b"},
        {"image": "a", "imgae": "b"},
        {"image": "a", "fetch": "later"},
        {"image": "a", "repository": "https://evil.example/"},
        {"image": "a", "repository": "../etc"},
        {"image": "/etc/passwd"},
        {"image": "a/../../b"},
        {"image": "sha256:1234"},
        {"layers": "a,,b"},
        {"layers": ",".join(["a"] * (a.MAX_LAYERS + 1))},
        {"image": "a", "imageFromPVCAnnotation": "true"},  # a parameter, not a volume key
    ],
)
def test_bad_volume_attributes(attrs: dict[str, str]) -> None:
    assert code(a.parse_volume_attributes, attrs) == grpc.StatusCode.INVALID_ARGUMENT


def test_parameters_and_pod_info() -> None:
    p = a.parse_parameters(
        {
            "imageFromPVCAnnotation": "true",
            "csi.storage.k8s.io/pvc/name": "n",
            "csi.storage.k8s.io/pvc/namespace": "ns",
        }
    )
    assert p.from_pvc_annotation and p.refs == () and (p.pvc_namespace, p.pvc_name) == ("ns", "n")
    assert code(a.parse_parameters, {"imageFromPVCAnnotation": "true"}) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code(a.parse_parameters, {"image": "x", "imageFromPVCAnnotation": "maybe"}) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    info = a.pod_info({**{k: "v" for k in (a.POD_NAME, a.POD_NAMESPACE)}, a.EPHEMERAL: "true"})
    assert info.name == "v" and info.ephemeral and not a.pod_info({}).ephemeral


# -- volume ids -------------------------------------------------------------------------------

#: What a configuration accepts as a repository name (RepositoryConfig checks it).
repo_names = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?", fullmatch=True)
digests = st.binary(min_size=32, max_size=32)


@given(
    name=st.text(min_size=1, max_size=300),
    repo=repo_names,
    images=st.lists(digests, min_size=1, max_size=a.MAX_LAYERS),
    lazy=st.booleans(),
)
def test_volume_id_roundtrip(name: str, repo: str, images: list[bytes], lazy: bool) -> None:
    spec = volumeid.PinnedSpec(repository=repo, images=tuple(images), lazy=lazy)
    vid = volumeid.encode(name, spec)
    assert len(vid.encode()) <= volumeid.MAX_ID
    assert volumeid.is_ours(vid)
    context = spec.context() if vid.startswith("cfs1h:") else None
    assert volumeid.decode(vid, context) == spec
    assert volumeid.encode(name, spec) == vid  # deterministic
    assert volumeid.encode(name + "x", spec) != vid


@pytest.mark.parametrize("name", [" ", "0 ", "Models", "a_b", "-a", "a-", "a/b", "a:b", "x" * 64])
def test_repository_names_are_kubernetes_style(name: str) -> None:
    """Names a volume id could not carry are refused where the admin writes them."""
    from csi.fetch import ConfigError, RepositoryConfig

    with pytest.raises(ConfigError, match="repository name"):
        RepositoryConfig(name=name, urls=("/srv/repo",))
    for good in ("a", "models", "team-a.models", "0", "x" * 63):
        RepositoryConfig(name=good, urls=("/srv/repo",))


def test_volume_id_rejects_garbage() -> None:
    spec = volumeid.PinnedSpec("models", (D1,), False)
    vid = volumeid.encode("pvc-1", spec)
    assert vid.startswith("cfs1:") and "models" in vid
    for bad in ("", "pvc-123", "cfs1:", vid + "+", vid.replace(":e:", ":x:"), vid[:-1]):
        with pytest.raises(ValueError):
            volumeid.decode(bad)
    many = volumeid.PinnedSpec("models", (D1, D2, D1, D2), True)
    hid = volumeid.encode("pvc-2", many)
    assert hid.startswith("cfs1h:")
    with pytest.raises(ValueError):
        volumeid.decode(hid)  # needs its context
    other = volumeid.PinnedSpec("models", (D1, D2, D1), True).context()
    with pytest.raises(ValueError):
        volumeid.decode(hid, other)
    assert volumeid.decode(hid, many.context()) == many


# -- redaction and the interceptor -----------------------------------------------------------


def test_redaction_removes_secrets() -> None:
    req = pb.NodePublishVolumeRequest(
        volume_id="v",
        target_path="/t",
        secrets={"password": "hunter2"},
        volume_context={a.SA_TOKENS: '{"aud":{"token":"eyJhbGc"}}', a.POD_NAME: "p"},
    )
    out = redacted(req)
    text = repr(out)
    assert "hunter2" not in text and "eyJhbGc" not in text
    assert out["secrets"] == STRIPPED
    assert out["volume_context"][a.SA_TOKENS] == STRIPPED
    assert out["volume_context"][a.POD_NAME] == "p"
    create = pb.CreateVolumeRequest(name="n", secrets={"k": "s3cr3t"})
    assert "s3cr3t" not in repr(redacted(create))


class _Details:
    method = "/csi.v1.Node/NodePublishVolume"
    invocation_metadata: tuple[()] = ()


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


def _run(behavior: Any, request: Any) -> _Context:
    handler = grpc.unary_unary_rpc_method_handler(behavior)
    wrapped = CsiInterceptor().intercept_service(lambda d: handler, _Details())  # type: ignore[arg-type]
    assert wrapped is not None and wrapped.unary_unary is not None
    ctx = _Context()
    with contextlib.suppress(RuntimeError):
        wrapped.unary_unary(request, ctx)  # type: ignore[arg-type]
    return ctx


def test_interceptor_maps_errors_and_never_logs_secrets(caplog: pytest.LogCaptureFixture) -> None:
    req = pb.NodePublishVolumeRequest(
        volume_id="v", secrets={"pw": "hunter2"}, volume_context={a.SA_TOKENS: "tok3n"}
    )

    def fails(request: Any, context: Any) -> Any:
        raise Unreachable("connection refused", repository="models")

    with caplog.at_level(logging.DEBUG, logger="csi.server.grpc"):
        ctx = _run(fails, req)
    assert ctx.aborted is not None and ctx.aborted[0] == grpc.StatusCode.UNAVAILABLE
    assert "models" in ctx.aborted[1]
    assert "NodePublishVolume" in caplog.text and "UNAVAILABLE" in caplog.text
    assert "hunter2" not in caplog.text and "tok3n" not in caplog.text

    def crashes(request: Any, context: Any) -> Any:
        raise KeyError("boom")

    assert _run(crashes, req).aborted[0] == grpc.StatusCode.INTERNAL  # type: ignore[index]


@pytest.mark.parametrize(
    ("error", "want"),
    [
        (InvalidReference("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (AccessDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (Unreachable("x"), grpc.StatusCode.UNAVAILABLE),
        (TimedOut("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Corrupt("x"), grpc.StatusCode.DATA_LOSS),
        (NoSpace("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (StoreFull("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NotImplementedError(), grpc.StatusCode.UNIMPLEMENTED),
        (ValueError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_error_mapping(error: Exception, want: grpc.StatusCode) -> None:
    assert to_csi_error(error).code == want


# -- mount table ---------------------------------------------------------------------------------

MOUNTINFO = (
    "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    "100 36 0:52 /0d05 /var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/v/mount "
    "ro,nosuid,nodev,relatime shared:5 - fuse.composefs-csi composefs-csi ro,user_id=0\n"
    "101 36 0:53 / /with\\040space rw - tmpfs tmp\\011fs rw\n"
    "garbage line\n"
)


def test_parse_mountinfo() -> None:
    m = parse_mountinfo(MOUNTINFO)
    assert len(m) == 3
    assert m[0].mountpoint == "/mnt/parent" and m[0].fstype == "ext3" and not m[0].read_only
    assert m[1].fstype == "fuse.composefs-csi" and m[1].root == "/0d05" and m[1].read_only
    assert {"nosuid", "nodev"} <= m[1].options
    assert m[2].mountpoint == "/with space" and m[2].source == "tmp\tfs"


def test_metrics_address() -> None:
    assert parse_address("") is None
    assert parse_address(":9809") == ("0.0.0.0", 9809)
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    with pytest.raises(ValueError):
        parse_address("nonsense")


# -- fetch jobs and locks -------------------------------------------------------------------------


class FakeFetcher:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[tuple[str, bytes, bool]] = []
        self.fail: Exception | None = None
        self.done: set[bytes] = set()

    def resolve(self, repository: str, ref: str) -> bytes:
        return D1

    def fetch(self, repository: str, image: bytes, *, lazy: bool, progress: FetchProgress) -> None:
        self.calls.append((repository, image, lazy))
        assert self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        self.done.add(image)


def jobs_for(f: FakeFetcher) -> FetchJobs:
    def complete(image: bytes, lazy: bool) -> bool:
        return image in f.done

    return FetchJobs(f, is_complete=complete)


def test_fetch_jobs_are_joined_not_restarted() -> None:
    f = FakeFetcher()
    jobs = jobs_for(f)
    for _ in range(3):
        with pytest.raises(CsiError) as e:
            jobs.ensure("r", [D1], lazy=False, wait=0.01)
        assert e.value.code == grpc.StatusCode.ABORTED and "in progress" in e.value.message
    assert f.calls == [("r", D1, False)]
    # a lazy need joins the running eager fetch
    with pytest.raises(CsiError):
        jobs.ensure("r", [D1], lazy=True, wait=0.01)
    assert f.calls == [("r", D1, False)]
    f.gate.set()
    assert jobs.ensure("r", [D1], lazy=False, wait=10) is False
    assert jobs.ensure("r", [D1], lazy=False, wait=10) is True  # warm now
    assert f.calls == [("r", D1, False)]
    jobs.close()


def test_failed_fetch_is_retried_afresh() -> None:
    f = FakeFetcher()
    f.fail = NotFound("gone", repository="r")
    f.gate.set()
    jobs = jobs_for(f)
    with pytest.raises(NotFound):
        jobs.ensure("r", [D2], lazy=False, wait=10)
    f.fail = None
    assert jobs.ensure("r", [D2], lazy=False, wait=10) is False
    assert len(f.calls) == 2
    assert jobs.running() == []
    jobs.close()


def test_keyed_locks() -> None:
    locks = KeyedLocks("volume")
    with locks.hold("a"):
        with pytest.raises(CsiError) as e, locks.hold("a"):
            pass
        assert e.value.code == grpc.StatusCode.ABORTED
        with locks.hold("b"):
            assert locks.busy() == {"a", "b"}
    assert locks.busy() == set()
    with locks.hold("a"):
        pass
