"""Acceptance: images imported from a real registry equal ``umoci raw unpack`` of the same image.

Layered images are generated (every entry kind, whiteouts, opaque directories, hard links within
and across layers, writes through symlinked directories, xattrs, devices, setuid bits,
nanosecond mtimes), made into OCI images by ``umoci raw add-layer`` and pushed by ``skopeo`` into
Debian's ``docker-registry`` on loopback. ``composefs-csi import`` then reads them from the
registry; the image, mounted by the kernel (EROFS + overlayfs, as ``mount.composefs`` does) and
by our FUSE data plane, must equal the directory ``umoci raw unpack`` makes of the same image,
field by field (type, mode, owner, nlink, size, mtime ns, rdev, symlink targets, xattrs, hard
link groups) and byte by byte (SHA-256 of every file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.oci.importer import ImportOptions, ImportResult, run_import
from csi.repo import Repository
from csi.repo import provenance as prov
from tests.fuse_helpers import fuse_unavailable, run_daemon
from tests.ocikit import (
    Registry,
    registry,
    repo_files,
    run,
    skopeo_copy,
    tools_missing,
    umoci_image,
    umoci_unpack,
)
from tests.ocilayers import Layout, layer_tar, random_layers
from tests.support.kernel import escape_overlay_path, have_kernel_composefs, mount_composefs
from tests.support.snapshot import Snapshot, diff_snapshots, snapshot

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _facilities() -> None:
    reason = tools_missing() or have_kernel_composefs() or fuse_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if tools_missing():
        pytest.skip(str(tools_missing()))
    with registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


def make_image(work: Path, seed: int, layers: int, **kw: bool) -> tuple[Path, str]:
    """An umoci-made OCI layout holding the generated image as tag ``t``."""
    layout = work / f"layout-{seed}"
    tars = [layer_tar(entries) for entries in random_layers(seed, layers, **kw)]
    umoci_image(layout, "t", tars, work)
    return layout, "t"


def do_import(source: str, repo: Path, **kw: object) -> ImportResult:
    options = ImportOptions(plain_http=True, **kw)  # type: ignore[arg-type]
    return run_import(source, Repository(repo, create=True), options)


def kernel_snapshot(repo: Path, digest: bytes) -> Snapshot:
    with mount_composefs(repo / "images" / digest.hex(), repo / "objects") as mnt:
        return snapshot(mnt)


@contextlib.contextmanager
def kernel_stack(repo: Path, digests: list[bytes]) -> Iterator[Path]:
    """Each image mounted as composefs, stacked (lowest first) by a read-only overlayfs with
    ``xino=on``: without it, inode numbers of different layers collide in the stack and files
    of different layers would look hard-linked."""
    with contextlib.ExitStack() as st:
        mounts = [
            st.enter_context(mount_composefs(repo / "images" / d.hex(), repo / "objects"))
            for d in digests
        ]
        target = Path(tempfile.mkdtemp(prefix="cfs-oci-stack-"))
        lower = ":".join(escape_overlay_path(m) for m in reversed(mounts))
        run("mount", "-t", "overlay", "overlay", "-o", f"ro,xino=on,lowerdir={lower}", target)
        try:
            yield target
        finally:
            run("umount", target)
            target.rmdir()


def unpack(layout: Path, tag: str, dest: Path) -> Snapshot:
    """``umoci raw unpack`` of the image, as a snapshot.

    umoci stamps directories it changed after their own entry was applied (a whiteout that
    empties a directory below the one it names, a directory created implicitly) with the time
    of the unpack; the image says nothing about that time and an import keeps the time from the
    image. Those mtimes (later than the unpack's start, and only ever on directories) are
    marked ``-1`` here and not compared."""
    start = time.time_ns()
    snap = snapshot(umoci_unpack(layout, tag, dest))
    for p, e in snap.items():
        if e.mtime_ns >= start:
            assert e.type == "dir", f"umoci gave {p} ({e.type}) the time of the unpack"
            snap[p] = dataclasses.replace(e, mtime_ns=-1)
    return snap


def assert_same(reference: Snapshot, seen: Snapshot, what: str, **kw: object) -> None:
    seen = {
        p: dataclasses.replace(e, mtime_ns=-1)
        if p in reference and reference[p].mtime_ns == -1 and e.type == "dir"
        else e
        for p, e in seen.items()
    }
    problems = diff_snapshots(reference, seen, **kw)  # type: ignore[arg-type]
    assert problems == [], f"{what} differs from umoci raw unpack:\n" + "\n".join(problems[:40])


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_flattened_import_equals_umoci_unpack(reg: Registry, tmp_path: Path, seed: int) -> None:
    layout, tag = make_image(tmp_path, seed, 3)
    ref = reg.push(f"oci:{layout}:{tag}", f"gen/img{seed}:v1")
    repo = tmp_path / "repo"
    result = do_import(ref, repo, refs=["img:v1"])
    assert result.kind == "image" and result.layer_count == 3 and len(result.images) == 1
    digest = result.images[0]
    reference = unpack(layout, tag, tmp_path / "unpacked")
    stamped = [p for p, e in reference.items() if e.mtime_ns == -1]
    kernel = kernel_snapshot(repo, digest)
    assert_same(reference, kernel, "kernel mount")
    with run_daemon(repo) as d:
        assert_same(reference, snapshot(d.view_path([digest])), "FUSE view")
    # Byte-identical to building the unpacked directory (mkcomposefs-compatible builder), once
    # the directories umoci stamped with its own time have the image's time back.
    for p in stamped:
        t = kernel[p].mtime_ns
        os.utime(tmp_path / "unpacked" / p.lstrip("/"), ns=(t, t), follow_symlinks=False)
    built = subprocess.run(
        [sys.executable, "-m", "csi.cli.main", "build", str(tmp_path / "unpacked"),
         "--repo", str(tmp_path / "built")],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.strip()  # fmt: skip
    assert built == f"sha256:{digest.hex()}"


def test_layers_compose_to_umoci_unpack(reg: Registry, tmp_path: Path) -> None:
    """``--layers``: each layer its own image (overlay whiteouts); stacked by overlayfs over
    kernel composefs mounts, and composed by our FUSE data plane, they show the unpacked image.

    Left out of the comparison, by construction of overlay stacks: link counts (overlayfs
    reports 1 for merged directories, and a layer's file keeps counting the names it had in its
    layer when a later layer removes one; which names share an inode is still compared) and
    the ``user.overlay.*`` markers composefs puts on directories holding whiteouts (the
    ``trusted.overlay.*`` ones are hidden)."""

    def plain(s: Snapshot) -> Snapshot:
        out = {}
        for p, e in s.items():
            xa = tuple((k, v) for k, v in (e.xattrs or ()) if not k.startswith("user.overlay."))
            out[p] = dataclasses.replace(e, xattrs=xa, nlink=0)
        return out

    for seed in (11, 12, 13):
        layout, tag = make_image(tmp_path, seed, 4, cross_layer_links=False)
        ref = reg.push(f"oci:{layout}:{tag}", f"gen/layers{seed}:v1")
        repo = tmp_path / f"repo{seed}"
        result = do_import(ref, repo, layers=True, refs=["app"])
        assert len(result.images) == 4
        assert result.refs == [f"app-layer{i}" for i in range(4)]
        reference = plain(unpack(layout, tag, tmp_path / f"unpacked{seed}"))
        with kernel_stack(repo, result.images) as mnt:
            assert_same(reference, plain(snapshot(mnt)), f"seed {seed}: overlayfs stack")
        with run_daemon(repo) as d:
            seen = plain(snapshot(d.view_path(result.images)))
        assert_same(reference, seen, f"seed {seed}: FUSE composition")


def test_compressions_and_transports_give_one_image(reg: Registry, tmp_path: Path) -> None:
    """gzip, zstd and uncompressed layers, from the registry, an OCI layout and a docker
    archive: one and the same composefs image (and the same digest imported twice)."""
    layers = random_layers(21, 2)
    layout, tag = make_image(tmp_path, 21, 2)  # umoci's gzip
    hand = Layout(tmp_path / "hand")
    tars = [layer_tar(entries) for entries in layers]
    sources = [reg.push(f"oci:{layout}:{tag}", "gen/comp:umoci")]
    for comp in ("gzip", "zstd", "none"):
        src = hand.tag(comp, hand.image(tars, compression=comp))
        sources.append(reg.push(src, f"gen/comp:{comp}", "--preserve-digests"))
        manifest = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false", sources[-1]))
        suffix = {"gzip": ".tar+gzip", "zstd": ".tar+zstd", "none": ".tar"}[comp]
        assert all(layer["mediaType"].endswith(suffix) for layer in manifest["layers"])
    archive = tmp_path / "image.tar"
    skopeo_copy(f"oci:{layout}:{tag}", f"docker-archive:{archive}:gen/comp:archived")
    sources += [sources[0], f"oci:{layout}:{tag}", f"docker-archive:{archive}"]
    repo = tmp_path / "repo"
    seen = {src: tuple(do_import(src, repo).images) for src in sources}
    assert len(set(seen.values())) == 1, seen


def test_provenance_and_inspect(reg: Registry, tmp_path: Path) -> None:
    layout, tag = make_image(tmp_path, 31, 1)
    ref = reg.push(f"oci:{layout}:{tag}", "gen/prov:v1")
    repo = tmp_path / "repo"
    first = do_import(ref, repo, refs=["prov:v1"])
    again = do_import(ref, repo, refs=["prov:v1"])
    assert first.images == again.images
    raw_manifest = run("skopeo", "inspect", "--raw", "--tls-verify=false", ref).encode()
    manifest_digest = "sha256:" + hashlib.sha256(raw_manifest).hexdigest()
    assert first.manifest_digest == manifest_digest
    r = Repository(repo)
    record = prov.ref_record(r, "prov:v1")
    assert record is not None
    assert record["source"] == ref
    assert record["manifest_digest"] == manifest_digest
    assert record["image"] == f"sha256:{first.images[0].hex()}"
    sources = prov.image_sources(r, first.images[0])
    assert [s["manifest_digest"] for s in sources] == [manifest_digest]  # recorded once
    out = subprocess.run(
        [sys.executable, "-m", "csi.cli.main", "inspect", "prov:v1", "--repo", str(repo), "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    info = json.loads(out)
    assert info["provenance"]["manifest_digest"] == manifest_digest
    assert info["provenance"]["source"] == ref
    assert not [p for p in repo_files(repo) if p.startswith(".tmp/")]
