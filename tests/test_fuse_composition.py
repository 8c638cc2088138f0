"""Compositions against overlayfs itself: the same layers, each kernel-mounted as composefs and
stacked by overlayfs as lower layers, give the same view as our composition.

OCI whiteouts (``.wh.<name>``, ``.wh..wh..opq``) mean nothing to overlayfs, so for those the
kernel gets the overlay-style equivalent of each layer; directory sizes then differ by
construction (the OCI marker names take room in the directory) and are not compared.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from csi.image.tree import S_IFCHR, S_IFDIR, S_IFREG, Node, Tree
from tests.fuse_helpers import (
    OPAQUE,
    add_image,
    add_objects,
    diff,
    external,
    fuse_unavailable,
    layer_trees,
    oci_to_overlay,
    run_daemon,
    snapshot,
)
from tests.support.kernel import have_kernel_composefs, mount_composefs, mount_overlay

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]


@pytest.fixture(autouse=True)
def _facilities() -> None:
    reason = fuse_unavailable() or have_kernel_composefs()
    if reason:
        pytest.skip(reason)


def kernel_view(store: Path, digests: list[bytes]) -> contextlib.AbstractContextManager[Path]:
    @contextlib.contextmanager
    def cm() -> Any:
        with contextlib.ExitStack() as st:
            mnts = [
                st.enter_context(mount_composefs(store / "images" / d.hex(), store / "objects"))
                for d in digests
            ]
            yield st.enter_context(mount_overlay(list(reversed(mnts))))

    return cm()


def without_dir_sizes(snap: dict[str, Any]) -> dict[str, Any]:
    for rec in snap.values():
        if stat.S_ISDIR(rec["st_mode"]):
            del rec["st_size"], rec["st_blocks"]
    return snap


@pytest.mark.parametrize("oci", [False, True], ids=["overlay-whiteouts", "oci-whiteouts"])
def test_generated_layers_match_overlayfs(tmp_path: Path, oci: bool) -> None:
    store = tmp_path / "store"
    cases = []
    for seed in range(12):
        layers, blobs = layer_trees(seed, 2 + seed % 3, oci=oci)
        add_objects(store, blobs)
        ours = [add_image(store, t) for t in layers]
        kernel = [add_image(store, oci_to_overlay(t)) for t in layers] if oci else ours
        cases.append((seed, ours, kernel))
    with run_daemon(store) as d:
        for seed, ours, kernel in cases:
            a = snapshot(d.view_path(ours))
            with kernel_view(store, kernel) as k:
                b = snapshot(k)
            if oci:
                a, b = without_dir_sizes(a), without_dir_sizes(b)
            problems = diff(a, b)
            assert not problems, f"seed {seed}:\n" + "\n".join(problems)


def _dir(**x: bytes) -> Node:
    return Node(mode=S_IFDIR | 0o755, xattrs={k.encode(): v for k, v in x.items()})


def test_hand_written_layer_rules(tmp_path: Path) -> None:
    """Each rule on its own: hide, merge, delete, opaque, type changes, OCI markers."""
    store = tmp_path / "store"
    low = Tree(_dir())
    up = Tree(_dir())
    assert low.root.entries is not None and up.root.entries is not None
    f1, d1 = external(b"lower file" * 50)
    f2, d2 = external(b"upper file" * 50)
    low.root.add(b"replaced", f1)
    up.root.add(b"replaced", f2)
    low.root.add(b"merged", _dir())
    up.root.add(b"merged", _dir())
    low.root.entries[b"merged"].add(b"from-lower", Node(mode=S_IFREG | 0o644))  # type: ignore[union-attr]
    up.root.entries[b"merged"].add(b"from-upper", Node(mode=S_IFREG | 0o600))  # type: ignore[union-attr]
    low.root.add(b"deleted", Node(mode=S_IFREG | 0o644))
    up.root.add(b"deleted", Node(mode=S_IFCHR | 0o644, rdev=0))
    low.root.add(b"oci-deleted", Node(mode=S_IFREG | 0o644))
    up.root.add(b".wh.oci-deleted", Node(mode=S_IFREG | 0o644))
    low.root.add(b"opaque", _dir())
    low.root.entries[b"opaque"].add(b"hidden", Node(mode=S_IFREG | 0o644))  # type: ignore[union-attr]
    up.root.add(b"opaque", _dir(**{OPAQUE.decode(): b"y"}))
    low.root.add(b"oci-opaque", _dir())
    low.root.entries[b"oci-opaque"].add(b"hidden", Node(mode=S_IFREG | 0o644))  # type: ignore[union-attr]
    up.root.add(b"oci-opaque", _dir())
    up.root.entries[b"oci-opaque"].add(b".wh..wh..opq", Node(mode=S_IFREG | 0o644))  # type: ignore[union-attr]
    low.root.add(b"dir-becomes-file", _dir())
    up.root.add(b"dir-becomes-file", Node(mode=S_IFREG | 0o644))
    low.root.add(b"file-becomes-dir", Node(mode=S_IFREG | 0o644))
    up.root.add(b"file-becomes-dir", _dir())
    add_objects(store, [d1, d2])
    digests = [add_image(store, low), add_image(store, up)]
    with run_daemon(store) as d:
        v = d.view_path(digests)
        assert sorted(os.listdir(v)) == [
            "dir-becomes-file",
            "file-becomes-dir",
            "merged",
            "oci-opaque",
            "opaque",
            "replaced",
        ]
        assert (v / "replaced").read_bytes() == d2
        assert sorted(os.listdir(v / "merged")) == ["from-lower", "from-upper"]
        assert os.stat(v / "merged").st_nlink == 1  # merged directories, as overlayfs says
        assert os.listdir(v / "opaque") == []
        assert os.listdir(v / "oci-opaque") == []
        assert stat.S_ISREG(os.stat(v / "dir-becomes-file").st_mode)
        assert os.listdir(v / "file-becomes-dir") == []
        for gone in ("deleted", "oci-deleted", ".wh.oci-deleted", "opaque/hidden"):
            assert not (v / gone).exists()
        assert "trusted.overlay.opaque" not in os.listxattr(v / "opaque")
        # The same images on their own are shown as the kernel shows them: markers visible.
        up_only = d.view_path([digests[1]])
        assert (up_only / ".wh.oci-deleted").exists()
        assert os.getxattr(up_only / "opaque", "trusted.overlay.opaque") == b"y"
