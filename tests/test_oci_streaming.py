"""Streaming: the memory of an import does not grow with the size of a layer.

Two images, one layer each, differing only in the size of their files (16 MiB against 512
MiB, gzip and zstd): the peak RSS of ``composefs-csi import`` (a process of its own, measured
with ``wait4``) must be about the same for both. Layers are written to disk as they are made,
so the test itself stays small too."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import zstandard

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def write_layer(path: Path, total: int, compression: str) -> tuple[str, str, int]:
    """A compressed one-layer tar of 4 files of ``total / 4`` bytes each, streamed to ``path``;
    (blob digest, diff_id, blob size)."""
    raw = hashlib.sha256()
    blob = hashlib.sha256()
    size = 0
    gz = zlib.compressobj(1, wbits=31)
    zst = zstandard.ZstdCompressor(level=1).compressobj()
    rng = random.Random(total)
    with open(path, "wb") as f:

        def put(data: bytes) -> None:
            nonlocal size
            raw.update(data)
            out = gz.compress(data) if compression == "gzip" else zst.compress(data)
            blob.update(out)
            size += len(out)
            f.write(out)

        for i in range(4):
            ti = tarfile.TarInfo(f"file{i}")
            ti.size, ti.mode, ti.mtime = total // 4, 0o644, 1_700_000_000
            put(ti.tobuf(tarfile.PAX_FORMAT))
            left = ti.size
            while left:
                n = min(left, 4 * MiB)
                put(rng.randbytes(n // 2) + bytes(n - n // 2))
                left -= n
            put(bytes(-ti.size % 512))
        put(bytes(1024))
        out = gz.flush() if compression == "gzip" else zst.flush()
        blob.update(out)
        size += len(out)
        f.write(out)
    return blob.hexdigest(), raw.hexdigest(), size


def make_layout(root: Path, total: int, compression: str) -> str:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    tmp = root / "layer.tmp"
    digest, diff_id, size = write_layer(tmp, total, compression)
    tmp.rename(blobs / digest)

    def put(doc: dict[str, object]) -> tuple[str, int]:
        data = json.dumps(doc).encode()
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return f"sha256:{h}", len(data)

    config = put({"architecture": "amd64", "os": "linux",
                  "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]}})  # fmt: skip
    manifest = put(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config[0], "size": config[1]},
            "layers": [{"mediaType": f"application/vnd.oci.image.layer.v1.tar+{compression}",
                        "digest": f"sha256:{digest}", "size": size}],
        }
    )  # fmt: skip
    (root / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest[0],
             "size": manifest[1]}]})
    )  # fmt: skip
    return f"oci:{root}"


def peak_rss_kib(source: str, repo: Path) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-m", "csi.cli.main", "import", source, "--repo", str(repo)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 0, err
    return usage.ru_maxrss


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_memory_does_not_grow_with_layer_size(tmp_path: Path, compression: str) -> None:
    small = make_layout(tmp_path / "small", 16 * MiB, compression)
    large = make_layout(tmp_path / "large", 512 * MiB, compression)
    rss_small = peak_rss_kib(small, tmp_path / "repo-small")
    rss_large = peak_rss_kib(large, tmp_path / "repo-large")
    # 32x the data, at most 24 MiB more memory (buffers are 1 MiB; 512 MiB would show).
    print(f"peak RSS: {rss_small} KiB (16 MiB), {rss_large} KiB (512 MiB)")
    assert rss_large <= rss_small + 24 * 1024, (rss_small, rss_large)
    stored = sum(p.stat().st_size for p in (tmp_path / "repo-large" / "objects").rglob("*")
                 if p.is_file())  # fmt: skip
    assert stored >= 512 * MiB  # the files really went through
