"""fs-verity is enabled on stored files where the filesystem and kernel support it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from csi.metrics import REGISTRY
from csi.repo.verity import enable_verity
from csi.store import Store

from ._storekit import blob


@pytest.mark.root
def test_verity_enabled_on_ext4_with_verity(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("loop-mounting ext4 needs root")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed")
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-O", "verity", str(img)], check=True)
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount ext4: {r.stderr.strip()}")
    try:
        probe = mnt / "probe"
        probe.write_bytes(b"x" * 5000)
        fd = os.open(probe, os.O_RDONLY)
        err = enable_verity(fd)
        os.close(fd)
        if err:
            pytest.skip(f"kernel cannot enable fs-verity on ext4 here ({os.strerror(err)})")
        before = REGISTRY.get_sample_value("composefs_csi_store_verity_enabled_total") or 0.0
        with Store(mnt / "store") as s:
            d, added = s.add_object_bytes(blob("v", 100_000))
            assert added and s.usage().verity_files == 1
            with pytest.raises(OSError):
                open(s.object_path(d), "r+b").close()
        after = REGISTRY.get_sample_value("composefs_csi_store_verity_enabled_total")
        assert after == before + 1
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
