"""The quick-start demo (``make demo``): publish a sample tree and look at it every way we can.

Steps, each printed as it runs:
1. write a small sample tree (files, a large file, a symlink, a hard link, an xattr);
2. ``composefs-csi build`` it into a repository, then ``inspect`` and ``verify`` it;
3. ``composefs-csi pull`` it into a node store (dedup: a second image sharing most content);
4. when run as root: mount it with the kernel (EROFS + overlayfs) and list it.

Everything lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def _run(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "csi.cli.main", *args]
    print("$ composefs-csi " + " ".join(args), flush=True)
    r = subprocess.run(cmd, check=True, text=True, capture_output=capture)
    if capture:
        sys.stderr.write(r.stderr)
        return r.stdout
    return ""


def _sample_tree(root: Path, variant: bytes) -> None:
    (root / "docs").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "README").write_text("A sample tree published with composefs-csi.\n")
    (root / "docs" / "model.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, shared
    (root / "docs" / "notes.txt").write_bytes(b"notes " * 2000 + variant)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hello from composefs-csi\n")
    (root / "bin" / "tool").chmod(0o755)
    os.link(root / "docs" / "model.bin", root / "model-hardlink.bin")
    (root / "latest").symlink_to("docs/model.bin")
    os.setxattr(root / "README", "user.origin", b"demo")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="composefs-csi-demo-"))
    try:
        repo, store = work / "repo", work / "store"
        _step("1. a sample tree")
        for name, variant in (("v1", b"one"), ("v2", b"two")):
            _sample_tree(work / f"src-{name}", variant)
        subprocess.run(["find", str(work / "src-v1"), "-printf", "%M %s %p\n"], check=True)

        _step("2. publish it as a composefs image")
        digest = _run(
            "build", str(work / "src-v1"), "--repo", str(repo), "--ref", "sample:v1", capture=True
        ).strip()
        print(digest)
        _run("build", str(work / "src-v2"), "--repo", str(repo), "--ref", "sample:v2", capture=True)
        _run("inspect", "sample:v1", "--repo", str(repo))
        _run("inspect", "sample:v1", "--repo", str(repo), "--dump")
        _run("verify", "--repo", str(repo))

        _step("3. fetch it into a node store (only what the node lacks)")
        _run("pull", "sample:v1", "--repository", str(repo), "--store", str(store))
        _run("pull", "sample:v2", "--repository", str(repo), "--store", str(store))
        _run("fsck", "--store", str(store))

        _step("4. mount it with the kernel (EROFS + overlayfs data-only layer)")
        if os.geteuid() != 0:
            print("skipped: needs root")
        else:
            _kernel_mount(store, digest.removeprefix("sha256:"))
        print("\ndemo finished: every step above ran for real.")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kernel_mount(store: Path, digest: str) -> None:
    image = store / "images" / digest
    erofs, view = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    try:
        subprocess.run(
            ["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(erofs)], check=True
        )
        try:
            opts = f"ro,metacopy=on,redirect_dir=on,lowerdir={erofs}::{store / 'objects'}"
            subprocess.run(
                ["mount", "-t", "overlay", "composefs", "-o", opts, str(view)], check=True
            )
            try:
                subprocess.run(["ls", "-lR", str(view)], check=True)
                print("$ cat bin/tool")
                print((view / "bin" / "tool").read_text(), end="")
            finally:
                subprocess.run(["umount", str(view)], check=True)
        finally:
            subprocess.run(["umount", str(erofs)], check=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"kernel mount unavailable here: {e}")
    finally:
        erofs.rmdir()
        view.rmdir()


if __name__ == "__main__":
    raise SystemExit(main())
