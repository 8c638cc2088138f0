"""The quick start's main job (``make demo``) runs end to end and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from csi.server.errors import CsiError
from csi.server.targets import Places

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the demo's driver steps need root (FUSE, mounts)")
def test_demo_runs_end_to_end() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "csi.demo"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "running model v1" in out  # a file of the published volume was executed
    assert "Read-only file system" in out
    assert "tokenizer.bin" in out  # the composition shows v2's new file
    assert "composefs_csi_volumes_published 3.0" in out
    assert out.count("target removed = True") == 3
    assert "nothing is left mounted" in out


def test_missing_target_parent_is_the_callers_error(tmp_path: Path) -> None:
    places = Places(tmp_path, forbidden=[])
    with pytest.raises(CsiError) as e:
        places.open_target(places.target(str(tmp_path / "no-such-parent" / "mount")), create=True)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "parent directory" in e.value.message
    for made in (True, False):  # idempotent: made once, then found
        t = places.open_target(places.target(str(tmp_path / "mount")), create=True)
        assert t.created is made
        t.close()
    assert (tmp_path / "mount").is_dir()
