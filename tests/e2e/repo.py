"""The repository the driver pods fetch from: generated trees, built with ``composefs-csi build``,
served by nginx on the host where the pods' network reaches it (the podman bridge's gateway);
and the manifests the pods' reader checks the volumes against."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .podman import Podman

REPO_ROOT = Path(__file__).resolve().parents[2]
Manifest = dict[str, dict[str, Any]]


def write_tree(root: Path, seed: int, files: int, *, big: int = 0, prefix: str = "") -> None:
    """A deterministic tree: nested directories, sizes from 0 bytes to ``big`` (a few large
    files), an executable, a symlink."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [0, 1, 4095, 4096, 65537, 300_000]
    for i in range(files):
        d = root / prefix / f"d{i % 4}" / (f"s{i % 3}" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        size = sizes[i % len(sizes)] if i >= 2 or not big else big
        (d / f"f{i:03d}.bin").write_bytes(rng.randbytes(size))
    run = root / prefix / "bin" / "run"
    run.parent.mkdir(parents=True, exist_ok=True)
    run.write_text(f"#!/bin/sh\necho tree {seed}\n")
    run.chmod(0o755)
    (root / prefix / "latest").symlink_to("bin/run")


def manifest_of(root: Path) -> Manifest:
    """What a reader must find: every regular file (size, sha256) and symlink (target)."""
    out: Manifest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(Path(dirpath, d))]:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = {"type": "symlink", "target": os.readlink(p)}
            elif p.is_file():
                data = p.read_bytes()
                out[rel] = {
                    "type": "file",
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
    return out


def compose(lower: Manifest, upper: Manifest) -> Manifest:
    """The expected view of ``upper`` over ``lower`` with OCI whiteouts (``.wh.<name>``)."""
    out = dict(lower)
    for rel, entry in upper.items():
        head, _, name = rel.rpartition("/")
        if name.startswith(".wh."):
            hidden = (head + "/" if head else "") + name[len(".wh.") :]
            for k in [k for k in out if k == hidden or k.startswith(hidden + "/")]:
                del out[k]
            out[hidden] = {"type": "absent"}
            out[rel] = {"type": "absent"}  # the marker itself is not shown
        else:
            out[rel] = entry
    return out


def build(src: Path, repo: Path, ref: str) -> str:
    """``composefs-csi build``: returns ``sha256:<hex>``."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "csi.cli.main",
            "build",
            str(src),
            "--repo",
            str(repo),
            "--ref",
            ref,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"composefs-csi build {src}: {proc.stderr.strip()}")
    return proc.stdout.split()[-1]


def pod_network(podman: Podman) -> tuple[str, str]:
    """(gateway, subnet) of podman's default network, where the pods are."""
    net = json.loads(podman.out("network", "inspect", "podman"))[0]
    sub = net["subnets"][0]
    return str(sub["gateway"]), str(ipaddress.ip_network(sub["subnet"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(repo: Path, work: Path, gateway: str, subnet: str) -> Iterator[str]:
    """nginx serving ``repo`` to the pod network and loopback only; yields the pods' URL."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = _free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;\n"
        "events {}\n"
        f"http {{ access_log {work}/logs/nginx-access.log; sendfile on;\n"
        f"  server {{ listen 0.0.0.0:{port}; root {repo};\n"
        f"    allow 127.0.0.1; allow {subnet}; deny all;\n"
        "    location / { try_files $uri =404; } } }\n"
    )
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/meta.json", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "nginx did not start: " + (work / "nginx.err").read_text()
                    ) from None
                time.sleep(0.1)
        yield f"http://{gateway}:{port}/"
    finally:
        proc.terminate()
        proc.wait(10)
