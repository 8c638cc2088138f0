"""OCI artifacts (a model packaged ORAS / ModelPack style): plain-file layers become files named
by their ``org.opencontainers.image.title``, tar layers are unpacked, untitled blobs go under
``blobs/sha256/``. Pushed to docker-registry with the distribution API, imported, and mounted
by the kernel and by our FUSE data plane."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from csi.oci.errors import LayerError, OciError
from csi.oci.importer import ImportOptions, run_import
from csi.repo import Repository
from csi.repo import provenance as prov
from tests.fuse_helpers import fuse_unavailable, run_daemon
from tests.ocikit import push_blobs_and_manifest, registry, repo_files, tools_missing
from tests.ocilayers import E, Layout, layer_tar
from tests.support.kernel import have_kernel_composefs, mount_composefs
from tests.support.snapshot import diff_snapshots, snapshot

TITLE = "org.opencontainers.image.title"
ARTIFACT_TYPE = "application/vnd.example.model.v1"
FILES = {
    "model.safetensors": os.urandom(300_000),
    "config.json": b'{"architecture": "tiny"}\n',
    "tokenizer/vocab.txt": b"token\n" * 2000,
}
UNTITLED = os.urandom(5000)
NOTES = b"# notes\nunpacked from a tar layer\n" * 10


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def artifact(titles: dict[str, bytes] | None = None) -> tuple[list[bytes], dict[str, object]]:
    """(blobs, manifest) of the test artifact."""
    titles = FILES if titles is None else titles
    tar = layer_tar([E("extra", "dir"), E("extra/notes.md", data=NOTES)])
    config = b"{}"
    layers: list[dict[str, object]] = [
        {"mediaType": "application/octet-stream", "digest": sha(data), "size": len(data),
         "annotations": {TITLE: title}}
        for title, data in titles.items()
    ]  # fmt: skip
    layers.append({"mediaType": "application/octet-stream", "digest": sha(UNTITLED),
                   "size": len(UNTITLED)})  # fmt: skip
    layers.append({"mediaType": "application/vnd.cncf.model.weight.v1.tar", "digest": sha(tar),
                   "size": len(tar)})  # fmt: skip
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(config),
                   "size": len(config)},
        "layers": layers,
    }  # fmt: skip
    return [*titles.values(), UNTITLED, tar, config], manifest


def in_layout(tmp: Path, blobs: list[bytes], manifest: dict[str, object]) -> str:
    layout = Layout(tmp)
    for b in blobs:
        layout.blob(b)
    desc = layout.blob(json.dumps(manifest).encode())
    return layout.tag("v1", {"mediaType": manifest["mediaType"], **desc})


@pytest.mark.root
def test_artifact_files_by_title(tmp_path: Path) -> None:
    reason = tools_missing("docker-registry") or have_kernel_composefs() or fuse_unavailable()
    if reason:
        pytest.skip(reason)
    blobs, manifest = artifact()
    repo_dir = tmp_path / "repo"
    repo = Repository(repo_dir, create=True)
    with registry(tmp_path / "reg") as reg:
        ref = push_blobs_and_manifest(reg.host, "models/tiny", "v1", blobs, manifest)
        result = run_import(ref, repo, ImportOptions(plain_http=True, refs=["tiny:v1"]))
    assert result.kind == "artifact" and len(result.images) == 1
    digest = result.images[0]
    # The same artifact from an OCI layout is the same image.
    again = run_import(in_layout(tmp_path / "layout", blobs, manifest), repo, ImportOptions())
    assert again.images == [digest]
    record = prov.ref_record(repo, "tiny:v1")
    assert record is not None and record["kind"] == "artifact"
    assert record["artifact_type"] == ARTIFACT_TYPE
    assert record["manifest_digest"] == sha(json.dumps(manifest).encode())

    with mount_composefs(repo_dir / "images" / digest.hex(), repo_dir / "objects") as mnt:
        expected = {**FILES, f"blobs/sha256/{sha(UNTITLED)[7:]}": UNTITLED,
                    "extra/notes.md": NOTES}  # fmt: skip
        for rel, data in expected.items():
            p = mnt / rel
            assert p.read_bytes() == data, rel
            st = os.lstat(p)
            if rel != "extra/notes.md":
                assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (
                    0o644, 0, 0, 0,
                )  # fmt: skip
        found = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file())
        assert found == sorted(expected)
        kernel = snapshot(mnt)
    with run_daemon(repo_dir) as d:
        fuse = snapshot(d.view_path([digest]))
    assert diff_snapshots(kernel, fuse) == []


def test_artifact_errors(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo", create=True)
    before = repo_files(repo.root)
    blobs, manifest = artifact()
    src = in_layout(tmp_path / "ok", blobs, manifest)
    with pytest.raises(OciError, match="--layers applies to container images"):
        run_import(src, repo, ImportOptions(layers=True))
    for titles, message in (
        ({"../escape": b"x" * 100}, "path traversal"),
        ({"a/.wh.b": b"x"}, "whiteout name"),
    ):
        blobs, manifest = artifact(titles)
        with pytest.raises(LayerError, match=message):
            run_import(in_layout(tmp_path / message[:4], blobs, manifest), repo, ImportOptions())
    blobs, manifest = artifact({"same": b"1" * 100})
    layers = manifest["layers"]
    assert isinstance(layers, list)
    layers.insert(1, dict(layers[0]))
    with pytest.raises(LayerError, match="two layers are titled 'same'"):
        run_import(in_layout(tmp_path / "dup", blobs, manifest), repo, ImportOptions())
    assert repo_files(repo.root) == before
