"""Imports that must fail: clearly, and leaving nothing in the repository.

Unknown tags and repositories, a missing platform, corrupt blobs and manifests, wrong diff_ids,
malformed tars and path traversal, an import killed half way. After each, the repository holds
exactly the files it held before (the temp area's lock files aside)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.oci.errors import (
    DigestError,
    FormatError,
    LayerError,
    NotFoundError,
    OciError,
    PlatformError,
)
from csi.oci.importer import ImportOptions, run_import
from csi.oci.manifest import Platform
from csi.repo import Repository
from csi.repo.tmpfiles import WORKER_TEMP_SUFFIX
from tests.ocikit import Registry, registry, repo_files, tools_missing
from tests.ocilayers import E, Layout, layer_tar

ROOT = Path(__file__).resolve().parents[1]
BASE = [E("./", "dir"), E("etc", "dir"), E("etc/motd", data=b"welcome " * 40)]


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reason = tools_missing("docker-registry", "skopeo")
    if reason:
        pytest.skip(reason)
    with registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    """A repository holding one image already; it must look the same after every failure."""
    r = Repository(tmp_path / "repo", create=True)
    layout = Layout(tmp_path / "seed-layout")
    run_import(layout.tag("v1", layout.image([layer_tar(BASE)])), r, ImportOptions(refs=["seed"]))
    before = repo_files(r.root)
    yield r
    assert repo_files(r.root) == before, "the failed import left files behind"


def fails(source: str, repo: Repository, error: type[OciError], match: str, **kw: object) -> None:
    options = ImportOptions(plain_http=True, refs=["new:v1"], **kw)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        run_import(source, repo, options)


def test_unknown_tag_and_repository(reg: Registry, tmp_path: Path, repo: Repository) -> None:
    layout = Layout(tmp_path / "l")
    reg.push(layout.tag("v1", layout.image([layer_tar(BASE)])), "known/app:v1")
    fails(f"docker://{reg.host}/known/app:nope", repo, NotFoundError, "manifest nope not found")
    fails(f"docker://{reg.host}/known/app:nope", repo, NotFoundError, "MANIFEST_UNKNOWN")
    fails(f"docker://{reg.host}/unknown/app:v1", repo, NotFoundError, "not found in .*unknown/app")
    fails(f"docker://{reg.host}/known/app@sha256:{'0' * 64}", repo, NotFoundError, "not found")
    fails(f"oci:{tmp_path / 'l'}:nope", repo, NotFoundError, "no image tagged 'nope'")
    fails(f"oci:{tmp_path / 'nowhere'}", repo, NotFoundError, "not an OCI layout")
    fails(f"docker-archive:{tmp_path / 'none.tar'}", repo, NotFoundError, "cannot open")


def test_platforms(reg: Registry, tmp_path: Path, repo: Repository) -> None:
    layout = Layout(tmp_path / "l")
    arm = layout.image([layer_tar([*BASE, E("arch", data=b"arm64")])], platform=("linux", "arm64"))
    s390 = layout.image([layer_tar([*BASE, E("arch", data=b"s390x")])], platform=("linux", "s390x"))
    index = layout.index([(arm, ("linux", "arm64")), (s390, ("linux", "s390x"))])
    ref = reg.push(layout.tag("multi", index), "multi/app:v1", "--all", "--preserve-digests")
    host = Platform("linux", "amd64")
    fails(ref, repo, PlatformError, r"no image for platform linux/amd64 .*linux/arm64, linux/s390x",
          platform=host)  # fmt: skip
    fails(f"oci:{tmp_path / 'l'}:multi", repo, PlatformError, "choose one with --platform",
          platform=host)  # fmt: skip


def test_platform_is_chosen(reg: Registry, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "l")
    arm = layout.image([layer_tar([*BASE, E("arch", data=b"arm64")])], platform=("linux", "arm64"))
    amd = layout.image([layer_tar([*BASE, E("arch", data=b"amd64")])], platform=("linux", "amd64"))
    index = layout.index([(arm, ("linux", "arm64")), (amd, ("linux", "amd64"))])
    ref = reg.push(layout.tag("multi", index), "pick/app:v1", "--all", "--preserve-digests")
    repo = Repository(tmp_path / "repo", create=True)
    for want in ("arm64", "amd64"):
        options = ImportOptions(plain_http=True, platform=Platform("linux", want))
        result = run_import(ref, repo, options)
        assert result.platform == f"linux/{want}"
        assert result.manifest_digest == (arm if want == "arm64" else amd)["digest"]


def _registry_blob(reg: Registry, digest: str) -> Path:
    hx = digest.split(":", 1)[1]
    return reg.root / "data/docker/registry/v2/blobs/sha256" / hx[:2] / hx / "data"


def test_corrupt_layer_in_the_registry(reg: Registry, tmp_path: Path, repo: Repository) -> None:
    layout = Layout(tmp_path / "l")
    big = [*BASE, *(E(f"f{i}", data=os.urandom(5000)) for i in range(20))]
    desc = layout.image([layer_tar(big)], compression="none")
    ref = reg.push(layout.tag("v1", desc), "corrupt/app:v1", "--preserve-digests")
    manifest = json.loads(layout.blob_path(desc["digest"]).read_bytes())
    layer = manifest["layers"][0]["digest"]
    path = _registry_blob(reg, layer)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in a file's content: the tar stays valid
    path.write_bytes(bytes(data))
    fails(ref, repo, DigestError, f"layer 1/1 \\({layer}\\): content hashes to sha256:")


def test_corrupt_layouts(tmp_path: Path, repo: Repository) -> None:
    layout = Layout(tmp_path / "l")
    tar = layer_tar(BASE)
    wrong = "sha256:" + "1" * 64
    fails(layout.tag("diffid", layout.image([tar], diff_ids=[wrong])), repo, DigestError,
          "the image config gives the diff_id " + wrong)  # fmt: skip
    fails(layout.tag("count", layout.image([tar], diff_ids=[wrong, wrong])), repo, FormatError,
          "1 layers but 2 diff_ids")  # fmt: skip
    desc = layout.image([tar])
    src = layout.tag("tampered", desc)
    path = layout.blob_path(desc["digest"])
    # Same size, other bytes: the manifest no longer has the digest that names it.
    path.write_bytes(path.read_bytes().replace(b'"layers"', b'"Layers"'))
    fails(src, repo, DigestError, "content hashes to")
    schema1 = layout.blob(json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode())
    fails(layout.tag("old", {"mediaType": "application/vnd.docker.distribution.manifest.v1+json",
                             **schema1}), repo, FormatError, "schema 1")  # fmt: skip
    not_json = layout.blob(b"\x00\x01 not json")
    fails(layout.tag("junk", {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                              **not_json}), repo, FormatError, "not valid JSON")  # fmt: skip


def _bad_checksum(tar: bytes) -> bytes:
    raw = bytearray(tar)
    raw[1024 + 10] ^= 0x01  # a name byte of the second header
    return bytes(raw)


def _traversal_header() -> bytes:
    # Python's tarfile writes any name; the importer must refuse it.
    return layer_tar([*BASE, E("../../escaped", data=b"out of the tree")])


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (_bad_checksum(layer_tar(BASE)), "header checksum mismatch"),
        (layer_tar(BASE)[:1500], "ends inside"),
        (_traversal_header(), "refusing the path traversal in b'../../escaped'"),
        (
            layer_tar([*BASE, E("etc/passwd", "hardlink", target="../../../etc/passwd")]),
            "path traversal",
        ),
        (layer_tar([*BASE, E("dangling", "hardlink", target="nowhere")]), "does not exist"),
        (b"this is not a tar archive at all" * 100, "checksum mismatch"),
        (layer_tar([*BASE, E("etc/motd/child")]), "not a directory"),
    ],
    ids=[
        "checksum",
        "truncated",
        "traversal",
        "link-traversal",
        "dangling-link",
        "not-tar",
        "parent-file",
    ],
)
def test_malformed_layers(tmp_path: Path, repo: Repository, layer: bytes, message: str) -> None:
    layout = Layout(tmp_path / "l")
    fails(layout.tag("bad", layout.image([layer_tar(BASE), layer])), repo, LayerError, message)


def test_malformed_layer_from_the_registry(reg: Registry, tmp_path: Path, repo: Repository) -> None:
    layout = Layout(tmp_path / "l")
    src = layout.tag("bad", layout.image([layer_tar(BASE), _traversal_header()]))
    ref = reg.push(src, "bad/app:v1", "--preserve-digests")
    fails(ref, repo, LayerError, "layer 2/2 .*path traversal")
    proc = subprocess.run(
        [sys.executable, "-m", "csi.cli.main", "import", ref, "--repo", str(repo.root),
         "--plain-http"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == ""
    assert "composefs-csi import: error: " in proc.stderr and "path traversal" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_killed_import_leaves_only_temp_files_that_are_cleaned(
    tmp_path: Path, repo: Repository
) -> None:
    layout = Layout(tmp_path / "big")
    files = [E(f"f{i:02d}", data=os.urandom(8 << 20)) for i in range(24)]
    src = layout.tag("big", layout.image([layer_tar([*BASE, *files])], compression="none"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "csi.cli.main", "import", src, "--repo", str(repo.root)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    tmp = repo.root / ".tmp"
    try:
        while proc.poll() is None:
            if len(list(tmp.glob(f"{proc.pid}-*{WORKER_TEMP_SUFFIX}"))) >= 2:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the import finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    leftover = list(tmp.glob(f"{proc.pid}-*{WORKER_TEMP_SUFFIX}"))
    assert leftover, "the killed import wrote its objects as temp files"
    # The next opening of the repository's temp area (as every store does) removes them.
    assert repo.tmp.clean() >= len(leftover)
    assert not list(tmp.glob(f"{proc.pid}-*"))


def test_no_partial_image_for_an_artifact_with_a_short_blob(
    tmp_path: Path, repo: Repository
) -> None:
    layout = Layout(tmp_path / "l")
    blob = os.urandom(1000)
    desc = layout.blob(blob)
    desc["size"] = 2000  # the descriptor says more than there is
    cfg = layout.blob(b"{}")
    manifest = layout.manifest(
        {
            "artifactType": "application/vnd.example+type",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", **cfg},
            "layers": [{"mediaType": "application/octet-stream", **desc,
                        "annotations": {"org.opencontainers.image.title": "f.bin"}}],
        }
    )  # fmt: skip
    fails(layout.tag("short", manifest), repo, DigestError, "1000 bytes, its descriptor says 2000")
