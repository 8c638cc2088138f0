"""The layer rules of the importer (``csi.oci.apply``) and the per-layer images (``csi.oci.delta``),
without mounts: each rule on its own, and generated layer stacks whose per-layer images, merged
by a model of overlayfs, must give the flattened tree."""

from __future__ import annotations

import io
import stat
from pathlib import Path
from typing import Any

import pytest

from csi.image.tree import HardLink, Node
from csi.image.writer import write_image
from csi.oci.apply import Applier, finish_tree
from csi.oci.delta import OVERLAY_OPAQUE, layer_tree
from csi.oci.errors import LayerError
from csi.oci.objects import ObjectSink
from csi.oci.streams import ByteReader
from csi.oci.tarstream import TarReader
from csi.oci.unpack import apply_tar
from csi.repo import Repository
from tests.ocilayers import E, layer_tar, random_layers


def apply_layers(
    tmp: Path, layers: list[list[E]], *, layers_mode: bool = False
) -> tuple[Node, list[Node]]:
    """Apply ``layers``; (the flattened root, each layer's image root)."""
    repo = Repository(tmp / "repo", create=True)
    sink = ObjectSink(repo)
    applier = Applier(overlay_private_xattrs=layers_mode)
    deltas = []
    try:
        for i, entries in enumerate(layers):
            applier.begin_layer()
            data = io.BytesIO(layer_tar(entries))
            tar = TarReader(ByteReader(lambda d=data: d.read(65536)), f"layer {i}")
            apply_tar(tar, applier, sink, f"layer {i}", layers_mode=layers_mode)
            deltas.append(layer_tree(applier.root, applier.changes).root)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    return applier.root, deltas


def lookup(root: Node, path: str) -> Node | None:
    node: Node | None = root
    for part in path.split("/"):
        if not part:
            continue
        if node is None or node.entries is None or part.encode() not in node.entries:
            return None
        entry = node.entries[part.encode()]
        node = entry.target if isinstance(entry, HardLink) else entry
    return node


def names(root: Node, path: str = "") -> list[str]:
    node = lookup(root, path)
    assert node is not None and node.entries is not None
    return sorted(n.decode() for n in node.entries)


def D(path: str, **kw: Any) -> E:
    return E(path, "dir", **kw)


# -- each rule ------------------------------------------------------------------------------------


def test_whiteouts_keep_what_their_own_layer_wrote(tmp_path: Path) -> None:
    base = [D("./"), D("a"), E("a/x", data=b"x"), E("a/y", data=b"y"), D("b"), E("b/old")]
    upper = [
        D("a"),
        E("a/new", data=b"new"),  # written first ...
        E("a", "whiteout"),  # ... then the directory is whited out: only a/new stays
        E("b", "opaque"),  # the marker first ...
        E("b/kept"),  # ... then new content
        E("gone", "whiteout"),  # nothing to remove: fine
    ]
    flat, deltas = apply_layers(tmp_path, [base, upper])
    assert names(flat) == ["a", "b"]
    assert names(flat, "a") == ["new"]
    assert names(flat, "b") == ["kept"]
    top = deltas[1]
    assert names(top, "a") == ["new", "x", "y"]
    for n in ("x", "y"):
        w = lookup(top, f"a/{n}")
        assert w is not None and w.is_whiteout
    b = lookup(top, "b")
    assert b is not None and b.xattrs.get(OVERLAY_OPAQUE) == b"y"


def test_recreated_directory_is_opaque_in_its_layer(tmp_path: Path) -> None:
    base = [D("./"), D("d"), E("d/lower")]
    upper = [E("d", "whiteout"), D("d", mode=0o700), E("d/upper")]
    flat, deltas = apply_layers(tmp_path, [base, upper])
    assert names(flat, "d") == ["upper"]
    d = lookup(deltas[1], "d")
    assert d is not None and d.xattrs.get(OVERLAY_OPAQUE) == b"y"
    assert stat.S_IMODE(d.mode) == 0o700


def test_directory_entry_over_directory_merges(tmp_path: Path) -> None:
    base = [D("./"), D("d", mode=0o755, uid=5, xattrs={"user.a": b"1"}), E("d/f")]
    upper = [D("d", mode=0o711, uid=7, mtime=5, xattrs={"user.b": b"2"})]
    flat, deltas = apply_layers(tmp_path, [base, upper])
    d = lookup(flat, "d")
    assert d is not None and names(flat, "d") == ["f"]
    assert (stat.S_IMODE(d.mode), d.uid, d.mtime_sec, d.xattrs) == (0o711, 7, 5, {b"user.b": b"2"})
    top = lookup(deltas[1], "d")
    assert top is not None and top.entries == {} and OVERLAY_OPAQUE not in top.xattrs


def test_symlinked_parents_are_followed_inside_the_tree(tmp_path: Path) -> None:
    layer = [
        D("./"),
        D("real"),
        D("real/sub"),
        E("abs", "symlink", target="/real"),
        E("rel", "symlink", target="real/sub"),
        E("up", "symlink", target="../../../../real"),  # .. stops at the root
        E("abs/a", data=b"a"),
        E("rel/b", data=b"b"),
        E("up/sub/c", data=b"c"),
        E("loop", "symlink", target="loop"),
    ]
    flat, _ = apply_layers(tmp_path, [layer])
    assert names(flat, "real") == ["a", "sub"]
    assert names(flat, "real/sub") == ["b", "c"]
    with pytest.raises(LayerError, match="too many levels of symbolic links"):
        apply_layers(tmp_path / "2", [[*layer, E("loop/x")]])


def test_hard_links(tmp_path: Path) -> None:
    base = [D("./"), E("f", data=b"F" * 100), E("g", "hardlink", target="f"), D("d")]
    upper = [E("f", data=b"new"), E("h", "hardlink", target="g")]
    flat, deltas = apply_layers(tmp_path, [base, upper])
    g, h, f = lookup(flat, "g"), lookup(flat, "h"), lookup(flat, "f")
    assert g is h and g is not f and f is not None and f.content == b"new"
    tree = finish_tree(flat)
    assert isinstance(tree.root.entries[b"h"], HardLink)  # type: ignore[index]
    assert g is not None and g.nlink == 2
    # The upper layer cannot share the lower inode: it has a copy of its own.
    top_h = lookup(deltas[1], "h")
    assert top_h is not None and top_h is not g and top_h.digest == g.digest
    for bad, message in (
        (E("x", "hardlink", target="missing"), "does not exist"),
        (E("x", "hardlink", target="d"), "directory"),
        (E("x", "hardlink", target="../../etc/passwd"), "path traversal"),
    ):
        with pytest.raises(LayerError, match=message):
            apply_layers(tmp_path / message.replace(" ", "-"), [base, [bad]])


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (E("../escape"), "path traversal"),
        (E("a/../../escape"), "path traversal"),
        (E("./", "file"), "root anything but a directory"),
        (E("f/child"), "not a directory"),
        (E(".wh."), "whiteout without a name"),
        (E("x" * 256), "longer than 255"),
        (E("l", "symlink", target="t" * 4096), "symlink target must be"),
    ],
)
def test_refused_entries(tmp_path: Path, entry: E, message: str) -> None:
    with pytest.raises(LayerError, match=message):
        apply_layers(tmp_path, [[D("./"), E("f"), entry]])


def test_xattrs_umoci_never_sets_are_dropped(tmp_path: Path) -> None:
    xattrs = {
        "user.kept": b"1",
        "trusted.kept": b"2",
        "security.selinux": b"x",
        "trusted.overlay.opaque": b"y",
        "trusted.overlay.redirect": b"/x",
        "trusted.overlay.whiteout": b"",
    }
    layer = [D("./"), E("f", data=b"z" * 100, xattrs=xattrs)]
    flat, _ = apply_layers(tmp_path, [layer])
    f = lookup(flat, "f")
    assert f is not None
    # An empty PAX value sets nothing (as Go reads it), so trusted.overlay.whiteout is absent.
    assert f.xattrs == {b"user.kept": b"1", b"trusted.kept": b"2"}
    xattrs["trusted.overlay.whiteout"] = b"w"
    layer = [D("./"), E("f", data=b"z" * 100, xattrs=xattrs)]
    flat, _ = apply_layers(tmp_path / "l", [layer], layers_mode=True)
    f = lookup(flat, "f")
    assert f is not None and f.xattrs == {b"user.kept": b"1", b"trusted.kept": b"2"}


def test_symlinks_are_0777(tmp_path: Path) -> None:
    flat, _ = apply_layers(tmp_path, [[D("./"), E("l", "symlink", target="x", mode=0o700)]])
    link = lookup(flat, "l")
    assert link is not None and link.mode == stat.S_IFLNK | 0o777


def test_implicit_directories(tmp_path: Path) -> None:
    flat, _ = apply_layers(tmp_path, [[E("a/b/c", data=b"c")]])
    a = lookup(flat, "a")
    assert a is not None and (a.mode, a.uid, a.gid, a.mtime_sec) == (stat.S_IFDIR | 0o755, 0, 0, 0)
    assert flat.mtime_sec == 0 and flat.mode == stat.S_IFDIR | 0o755


# -- per-layer images against a model of overlayfs -------------------------------------------------


def _plain(n: Node) -> Node:
    return n.target if isinstance(n, HardLink) else n  # type: ignore[return-value]


def overlay_merge(lower: Node | None, upper: Node) -> Node:
    """``upper`` (a layer image's directory) over ``lower`` (the merged view so far)."""
    out = Node(
        mode=upper.mode,
        uid=upper.uid,
        gid=upper.gid,
        mtime_sec=upper.mtime_sec,
        mtime_nsec=upper.mtime_nsec,
        xattrs={k: v for k, v in upper.xattrs.items() if k != OVERLAY_OPAQUE},
    )
    assert out.entries is not None and upper.entries is not None
    opaque = upper.xattrs.get(OVERLAY_OPAQUE) == b"y"
    if lower is not None and lower.entries is not None and not opaque:
        out.entries.update(lower.entries)
    for name, entry in upper.entries.items():
        child = _plain(entry)
        if child.is_whiteout:
            out.entries.pop(name, None)
        elif child.is_dir:
            below = out.entries.get(name)
            below_dir = _plain(below) if below is not None and _plain(below).is_dir else None
            out.entries[name] = overlay_merge(below_dir, child)
        else:
            out.entries[name] = child
    return out


def describe(root: Node) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    groups: dict[int, list[str]] = {}
    files: dict[str, Node] = {}
    stack = [("", root)]
    while stack:
        path, node = stack.pop()
        key = (node.mode, node.uid, node.gid, node.mtime_sec, node.mtime_nsec, node.rdev,
               tuple(sorted(node.xattrs.items())))  # fmt: skip
        if node.is_dir:
            assert node.entries is not None
            out[path or "/"] = key
            stack += [(f"{path}/{n.decode()}", _plain(c)) for n, c in node.entries.items()]
        else:
            groups.setdefault(id(node), []).append(path)
            files[path] = node
            out[path] = (*key, node.size, node.payload, node.content, node.digest)
    for path, node in files.items():
        out[path] += (min(groups[id(node)]),)  # the inode, named by its first path
    return out


@pytest.mark.parametrize("seed", range(12))
def test_layer_images_merge_to_the_flattened_tree(tmp_path: Path, seed: int) -> None:
    layers = random_layers(100 + seed, 2 + seed % 4, cross_layer_links=False)
    flat, deltas = apply_layers(tmp_path, layers, layers_mode=True)
    view: Node | None = None
    for d in deltas:
        view = overlay_merge(view, d)
        write_image(finish_tree(d))  # every layer image is writable as it is
    assert view is not None
    a, b = describe(flat), describe(view)
    assert sorted(a) == sorted(b)
    problems = [p for p in sorted(a) if a[p] != b[p]]
    assert not problems, f"seed {seed}: " + "; ".join(
        f"{p}: {a[p]} != {b[p]}" for p in problems[:5]
    )


@pytest.mark.parametrize("seed", range(4))
def test_import_is_deterministic(tmp_path: Path, seed: int) -> None:
    layers = random_layers(200 + seed, 3)
    one, _ = apply_layers(tmp_path / "1", layers)
    two, _ = apply_layers(tmp_path / "2", layers)
    assert write_image(finish_tree(one)) == write_image(finish_tree(two))
