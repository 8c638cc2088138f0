"""Views come and go with their holders; mounts and descriptors never leak; a dead daemon's
mount is repaired by the next one; the control socket rejects bad requests clearly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from csi.fuse.client import DataPlaneClient, DataPlaneError, DataPlaneUnavailable
from csi.fuse.daemon import view_key
from csi.fuse.mounting import is_mounted
from tests.fuse_helpers import add_image, free_port, fuse_unavailable, random_tree, run_daemon
from tests.support.kernel import mounts_under

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _facilities() -> None:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def store_with_images(tmp_path: Path) -> tuple[Path, list[bytes]]:
    store = tmp_path / "store"
    digests = []
    for seed in range(3):
        tree, blobs = random_tree(seed, n=30)
        digests.append(add_image(store, tree, blobs))
    return store, digests


def test_views_follow_their_holders(store_with_images: tuple[Path, list[bytes]]) -> None:
    store, (a, b, c) = store_with_images
    port = free_port()
    with run_daemon(store, metrics_address=f"127.0.0.1:{port}") as d:
        cl = d.client
        r1 = cl.add_view([a], "vol-1")
        r2 = cl.add_view([a], "vol-1")  # the same holder again: one hold
        r3 = cl.add_view([a], "vol-2")
        assert r1["created"] and not r2["created"] and not r3["created"]
        assert r1["path"] == r2["path"] == str(d.mountpoint / a.hex())
        comp = cl.add_view([b, c], "vol-3")
        assert comp["key"] == view_key([b, c], True) and comp["key"].startswith("c-")
        assert view_key([c, b], True) != comp["key"]  # order matters
        assert sorted(os.listdir(d.mountpoint)) == sorted([a.hex(), comp["key"]])
        views = {v["key"]: v for v in cl.list_views()}
        assert views[a.hex()]["holders"] == ["vol-1", "vol-2"]
        assert views[comp["key"]]["kind"] == "composition"
        assert views[comp["key"]]["images"] == [b.hex(), c.hex()]

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'composefs_csi_fuse_views{kind="image"} 1.0' in metrics
        assert 'composefs_csi_fuse_views{kind="composition"} 1.0' in metrics
        assert "composefs_csi_fuse_operations_total" in metrics

        assert cl.remove_view(a.hex(), "vol-1") == {"removed": False, "holders": 1}
        assert cl.remove_view(a.hex(), "vol-1") == {"removed": False, "holders": 1}
        assert (d.mountpoint / a.hex()).is_dir()
        assert cl.remove_view(a.hex(), "vol-2") == {"removed": True, "holders": 0}
        assert not (d.mountpoint / a.hex()).exists()
        assert os.listdir(d.mountpoint) == [comp["key"]]
        assert cl.remove_view("nothing-here", "x") == {"removed": False, "holders": 0}
        # A view can come back after it went away.
        again = cl.add_view([a], "vol-4")
        assert again["created"] and sorted(os.listdir(Path(again["path"]))) != []


def test_open_file_survives_view_removal(store_with_images: tuple[Path, list[bytes]]) -> None:
    store, (a, _, _) = store_with_images
    with run_daemon(store) as d:
        view = Path(d.client.add_view([a], "vol")["path"])
        name = next(
            n for n in os.listdir(view) if (view / n).is_file() and os.stat(view / n).st_size > 64
        )
        with open(view / name, "rb") as f:
            expected = f.read()
            d.client.remove_view(a.hex(), "vol")
            assert not view.exists()
            # Without its cached pages, the read goes to the daemon, which still serves the
            # removed view for what the kernel holds of it.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.seek(0)
            assert f.read() == expected
            assert os.fstat(f.fileno()).st_size == len(expected)
        # Once the kernel has forgotten the view's inodes, the daemon unmaps its image.
        image = str(store / "images" / a.hex())
        deadline = time.monotonic() + 30
        while image in Path(f"/proc/{d.proc.pid}/maps").read_text():
            assert time.monotonic() < deadline, "the removed view's image stays mapped"
            time.sleep(0.05)


def test_mount_cycles_leave_nothing_behind(store_with_images: tuple[Path, list[bytes]]) -> None:
    store, digests = store_with_images
    for _ in range(3):
        with run_daemon(store) as d:
            for i, dg in enumerate(digests):
                view = Path(d.client.add_view([dg], f"vol-{i}")["path"])
                for p in view.rglob("*"):
                    if p.is_file() and not p.is_symlink():
                        p.read_bytes()
            assert any(str(store) in t for t in d.open_fds())  # objects cached open
            for i, dg in enumerate(digests):
                d.client.remove_view(dg.hex(), f"vol-{i}")
            # Removing every view releases every image mapping and object descriptor; only
            # the instance lock stays open while the daemon serves.
            held = [t for t in d.open_fds() if str(store) in t]
            assert [t for t in held if "/.tmp/dataplane/" not in t] == []
            mnt = d.mountpoint
        assert d.proc.returncode == 0
        assert not is_mounted(mnt)
        assert mounts_under(mnt.parent) == []


def test_stale_mount_of_a_killed_daemon_is_repaired(
    store_with_images: tuple[Path, list[bytes]], tmp_path: Path
) -> None:
    store, (a, _, _) = store_with_images
    with run_daemon(store) as d:
        d.client.add_view([a], "vol")
        mnt, sock = d.mountpoint, d.socket
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        with pytest.raises(OSError):
            os.listdir(mnt)  # ENOTCONN: the mount outlived its daemon
        # A new daemon on the same mountpoint and socket detaches the dead mount.
        cfg = Path(d.log).parent / "config.json"
        proc = subprocess.Popen(
            [os.sys.executable, "-m", "csi.fuse", str(cfg)],  # type: ignore[attr-defined]
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            DataPlaneClient(sock).wait_ready(30)
            assert os.listdir(mnt) == []
            DataPlaneClient(sock).add_view([a], "vol")
            assert os.listdir(mnt) == [a.hex()]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        assert proc.returncode == 0
        assert not is_mounted(mnt)


def test_control_errors(store_with_images: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    store, (a, _, _) = store_with_images
    with run_daemon(store) as d:
        cl = d.client
        with pytest.raises(DataPlaneError) as e:
            cl.add_view(["not-a-digest"], "h")
        assert e.value.code == "invalid_argument"
        with pytest.raises(DataPlaneError) as e:
            cl.add_view([b"\x01" * 32], "h")
        assert e.value.code == "not_found"
        with pytest.raises(DataPlaneError) as e:
            cl.add_view([a], "h", lazy=True, repository="nope")
        assert e.value.code == "invalid_argument"
        with pytest.raises(DataPlaneError) as e:
            cl.call("frobnicate")
        assert e.value.code == "invalid_argument"
        with pytest.raises(DataPlaneError) as e:
            cl.add_view([a], "")
        assert e.value.code == "invalid_argument"
        # A corrupt image in the store is refused, not served.
        bad = store / "objects" / "ee" / ("e" * 62)
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(b"\0" * 8192)
        (store / "images" / ("e" * 64)).symlink_to(f"../objects/ee/{'e' * 62}")
        with pytest.raises(DataPlaneError) as e:
            cl.add_view([bytes.fromhex("e" * 64)], "h")
        assert e.value.code == "invalid_image"
        assert cl.ping()["views"] == 0
    with pytest.raises(DataPlaneUnavailable):
        DataPlaneClient(tmp_path / "no.sock").ping()


def test_root_listing_follows_views_at_once(store_with_images: tuple[Path, list[bytes]]) -> None:
    """The kernel caches the mount root's listing and attributes (kernel opens): adding or
    removing a view invalidates them, so the next listing is right without waiting."""
    store, (a, b, _) = store_with_images
    with run_daemon(store) as d:
        root = d.mountpoint
        assert os.listdir(root) == [] and os.stat(root).st_nlink == 2
        for _ in range(3):
            d.client.add_view([a], "vol-a")
            assert os.listdir(root) == [a.hex()] and os.stat(root).st_nlink == 3
            d.client.add_view([b], "vol-b")
            assert sorted(os.listdir(root)) == sorted([a.hex(), b.hex()])
            assert os.stat(root).st_nlink == 4
            d.client.remove_view(a.hex(), "vol-a")
            assert os.listdir(root) == [b.hex()] and os.stat(root).st_nlink == 3
            d.client.remove_view(b.hex(), "vol-b")
            assert os.listdir(root) == [] and os.stat(root).st_nlink == 2
