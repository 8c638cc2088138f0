"""The OCI side of bench.network: a tree as a one-layer OCI image in a real registry, pulled by
real tools.

Server: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1 with filesystem storage.
Image: the tree as one gzip layer (``tar`` of the tree through ``gzip -6``, the level Go and
Docker use), pushed with ``skopeo copy`` from an OCI layout. Client: ``skopeo copy`` into an OCI
layout, then ``umoci raw unpack`` into a root filesystem: what a runtime does, without the
runtime.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.nginx import free_port

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
_CHUNK = 1 << 20


def tools_missing() -> list[str]:
    return [t for t in ("docker-registry", "skopeo", "umoci", "tar", "gzip") if not shutil.which(t)]


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def make_layout(tree: Path, layout: Path, tag: str) -> int:
    """Write ``tree`` as a one-layer OCI image layout at ``layout`` (tag ``tag``). Returns the
    size of the gzip layer."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = layout / "layer.tmp"
    diff = hashlib.sha256()
    with open(tmp, "wb") as out:
        tar = subprocess.Popen(
            [
                "tar",
                "-C",
                str(tree),
                "--sort=name",
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "-cf",
                "-",
                ".",
            ],
            stdout=subprocess.PIPE,
        )
        gz = subprocess.Popen(["gzip", "-6", "-n", "-c"], stdin=subprocess.PIPE, stdout=out)
        assert tar.stdout is not None and gz.stdin is not None
        while chunk := tar.stdout.read(_CHUNK):
            diff.update(chunk)
            gz.stdin.write(chunk)
        gz.stdin.close()
        if tar.wait() or gz.wait():
            raise RuntimeError("tar | gzip failed")
    layer_hash = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(_CHUNK):
            layer_hash.update(chunk)
    layer_digest = layer_hash.hexdigest()
    layer_size = tmp.stat().st_size
    tmp.rename(blobs / layer_digest)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff.hexdigest()}"]},
        }
    ).encode()
    config_digest, config_size = _blob(layout, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": f"sha256:{layer_digest}",
                    "size": layer_size,
                }
            ],
        }
    ).encode()
    manifest_digest, manifest_size = _blob(layout, manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest_digest,
                        "size": manifest_size,
                        "annotations": {"org.opencontainers.image.ref.name": tag},
                    }
                ],
            }
        )
    )
    return layer_size


class Registry:
    """``docker-registry serve`` on 127.0.0.1, storing under ``work``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def storage(self) -> Path:
        return self.work / "storage"

    def start(self) -> Registry:
        self.storage.mkdir(parents=True, exist_ok=True)
        cfg = self.work / "config.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log: {level: error, accesslog: {disabled: true}}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.storage}}}}}\n"
            f"http: {{addr: '127.0.0.1:{self.port}'}}\n"
        )
        self._proc = subprocess.Popen(
            [REGISTRY, "serve", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while True:
            r = subprocess.run(
                ["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{self.port}/v2/"],
                check=False,
            )
            if r.returncode == 0:
                return self
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("docker-registry did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def push(self, layout: Path, tag: str, name: str) -> None:
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{layout}:{tag}",
                f"docker://127.0.0.1:{self.port}/{name}:{tag}",
            ],
            check=True,
        )


@dataclass
class OciPull:
    seconds: float
    copy_seconds: float


def pull(port: int, name: str, tag: str, out: Path) -> OciPull:
    """``skopeo copy`` from the registry at ``port`` into ``out/layout``, then ``umoci raw
    unpack`` into ``out/rootfs``."""
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://127.0.0.1:{port}/{name}:{tag}",
            f"oci:{out / 'layout'}:{tag}",
        ],
        check=True,
    )
    t1 = time.perf_counter()
    subprocess.run(
        ["umoci", "raw", "unpack", "--image", f"{out / 'layout'}:{tag}", str(out / "rootfs")],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t2 = time.perf_counter()
    return OciPull(t2 - t0, t1 - t0)
