"""``composefs-csi mount``: the image at the mount root, in the foreground, unmounted cleanly on
SIGTERM/SIGINT; eager or lazy, from a repository directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csi.fuse.mounting import is_mounted
from csi.image.fsverity import digest_bytes
from csi.image.tree import S_IFDIR, Node, Tree
from csi.image.writer import write_image
from csi.repo import Repository
from tests.fuse_helpers import ROOT, external, fuse_unavailable

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def _facilities() -> None:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)


def _publish(repo_dir: Path) -> dict[str, bytes]:
    repo = Repository(repo_dir, create=True)
    files = {f"f{i}": os.urandom(3000 + i) for i in range(5)}
    tree = Tree(Node(mode=S_IFDIR | 0o755))
    for name, data in files.items():
        node, _ = external(data)
        repo.add_object_bytes(data)
        tree.root.add(name.encode(), node)
    repo.set_ref("app:v1", repo.add_image(write_image(tree)))
    return files


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_mount_command(tmp_path: Path, lazy: bool, sig: signal.Signals) -> None:
    files = _publish(tmp_path / "repo")
    mnt, store = tmp_path / "mnt", tmp_path / "store"
    code = (
        "import logging, sys; from pathlib import Path; "
        "from csi.fuse.mountcmd import mount_command; logging.basicConfig(level='INFO'); "
        f"sys.exit(mount_command('app:v1', Path({str(mnt)!r}), {str(tmp_path / 'repo')!r}, "
        f"Path({str(store)!r}), lazy={lazy}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(mnt):
            assert proc.poll() is None, "mount command exited early"
            assert time.monotonic() < deadline, "not mounted in time"
            time.sleep(0.05)
        if not lazy:  # every object (and the image) is local before the mount appears
            assert len(list((store / "objects").glob("*/*"))) == len(files) + 1
        assert sorted(os.listdir(mnt)) == sorted(files)
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data
        assert os.stat(mnt).st_ino == 1
        inner = os.stat(mnt / "f0").st_ino
        assert inner > 1 and inner < 1 << 34  # the nid itself, as the kernel shows it
        for data in files.values():  # lazy: fetched by the reads above
            h = digest_bytes(data).hex()
            assert (store / "objects" / h[:2] / h[2:]).is_file()
    finally:
        proc.send_signal(sig)
        proc.wait(30)
    assert proc.returncode == 0
    assert not is_mounted(mnt)
