"""The composefs writer: byte-identical to mkcomposefs 1.0.8, deterministic, and well-formed.

CI checks our output against image digests that mkcomposefs produced for the trees of
``tests/writer_trees.py`` (``tests/data/writer_golden.json``). Where a composefs 1.0.8 build is
available (``COMPOSEFS_UPSTREAM``), the upstream test assets and random trees are also compared
with mkcomposefs directly.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from csi.image import erofs as E
from csi.image.errors import TreeError
from csi.image.fsverity import digest_bytes
from csi.image.tree import S_IFDIR, S_IFLNK, S_IFREG, HardLink, Node, Tree
from csi.image.writer import choose_version, write_image
from tests.writer_trees import TREES, external, reg, tree_random

GOLDEN = json.loads((Path(__file__).parent / "data" / "writer_golden.json").read_text())
UPSTREAM = os.environ.get("COMPOSEFS_UPSTREAM")
needs_upstream = pytest.mark.skipif(
    not UPSTREAM, reason="COMPOSEFS_UPSTREAM (a composefs 1.0.8 build tree) is not set"
)


@pytest.mark.parametrize("name", sorted(TREES))
@pytest.mark.parametrize("version", [0, 1])
def test_golden_digests(name: str, version: int) -> None:
    image = write_image(TREES[name](), min_version=version)
    assert hashlib.sha256(image).hexdigest() == GOLDEN[name][f"v{version}"]


def test_golden_covers_every_tree() -> None:
    assert set(GOLDEN) == set(TREES)


@pytest.mark.parametrize("name", sorted(TREES))
def test_image_structure(name: str) -> None:
    image = write_image(TREES[name]())
    assert len(image) % E.BLOCK_SIZE == 0
    magic, hversion, _flags, cversion = E.HEADER.unpack_from(image, 0)
    assert (magic, hversion) == (E.COMPOSEFS_MAGIC, 1)
    assert cversion in (0, 1)
    assert image[32:1024] == bytes(992)
    sb = E.SUPERBLOCK.unpack_from(image, E.SUPER_OFFSET)
    assert sb[0] == E.EROFS_MAGIC
    assert sb[3] == 12  # blkszbits
    assert sb[9] * E.BLOCK_SIZE == len(image)  # blocks
    assert sb[5] == 36  # root nid: the root is the first inode, right after the superblock


@pytest.mark.skipif(shutil.which("fsck.erofs") is None, reason="fsck.erofs (erofs-utils) absent")
@pytest.mark.parametrize("name", ["basic", "xattrs", "hardlinks", "symlinks", "big_directories"])
def test_fsck_erofs_accepts(name: str, tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(write_image(TREES[name]()))
    r = subprocess.run(["fsck.erofs", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _shuffled_copy(tree: Tree, seed: int) -> Tree:
    """The same logical tree with entries and xattrs inserted in another order."""
    rng = random.Random(seed)
    made: dict[int, Node] = {}

    def copy(n: Node) -> Node:
        items = list(n.xattrs.items())
        rng.shuffle(items)
        c = Node(
            mode=n.mode,
            uid=n.uid,
            gid=n.gid,
            nlink=n.nlink,
            mtime_sec=n.mtime_sec,
            mtime_nsec=n.mtime_nsec,
            size=n.size,
            rdev=n.rdev,
            payload=n.payload,
            content=n.content,
            digest=n.digest,
            xattrs=dict(items),
        )
        made[id(n)] = c
        return c

    def fill(src: Node, dst: Node) -> list[tuple[Node, bytes, HardLink]]:
        links = []
        assert src.entries is not None and dst.entries is not None
        items = list(src.entries.items())
        rng.shuffle(items)
        for name, entry in items:
            if isinstance(entry, HardLink):
                links.append((dst, name, entry))
                continue
            c = copy(entry)
            dst.entries[name] = c
            if entry.is_dir:
                links += fill(entry, c)
        return links

    root = copy(tree.root)
    pending = fill(tree.root, root)
    # Hard links are inserted last, at their sorted position in the directory.
    for dst, name, link in pending:
        assert dst.entries is not None
        dst.entries[name] = HardLink(made[id(link.target)])
    return Tree(root)


@pytest.mark.parametrize("name", ["xattrs", "hardlinks", "random_3", "names_order"])
def test_input_order_does_not_matter(name: str) -> None:
    original = write_image(TREES[name]())
    for seed in range(3):
        assert write_image(_shuffled_copy(TREES[name](), seed)) == original


def test_tree_is_not_modified() -> None:
    tree = TREES["whiteouts"]()
    before = [(p, e.mode, dict(e.xattrs)) for p, e in tree.walk() if isinstance(e, Node)]
    first = write_image(tree)
    after = [(p, e.mode, dict(e.xattrs)) for p, e in tree.walk() if isinstance(e, Node)]
    assert before == after
    assert write_image(tree) == first


def test_version_selection() -> None:
    assert choose_version(TREES["basic"]()) == 0
    assert choose_version(TREES["whiteouts"]()) == 1
    assert choose_version(TREES["whiteouts"](), 0, 0) == 0
    assert choose_version(TREES["basic"](), 1, 1) == 1
    with pytest.raises(TreeError):
        choose_version(TREES["basic"](), 2, 2)


def test_external_file_xattrs_and_chunks() -> None:
    tree = Tree(Node(mode=S_IFDIR | 0o755))
    f = external(10_000)
    assert tree.root.entries is not None
    tree.root.entries[b"f"] = f
    image = write_image(tree)
    assert f.digest is not None and f.payload is not None
    metacopy = bytes((0, 36, 0, 1)) + f.digest
    assert metacopy in image
    assert b"/" + f.payload in image  # redirect
    assert struct.pack("<I", E.NULL_ADDR) in image  # the chunk index: a hole


def test_rejects_unrepresentable_trees() -> None:
    too_long = Tree(Node(mode=S_IFDIR | 0o755))
    too_long.root.add(b"l", Node(mode=S_IFLNK | 0o777, payload=b"x" * 4096))
    with pytest.raises(TreeError):
        write_image(too_long)
    inline = Tree(Node(mode=S_IFDIR | 0o755))
    inline.root.add(b"f", Node(mode=S_IFREG | 0o644, size=5001, content=b"x" * 5001))
    with pytest.raises(TreeError):
        write_image(inline)
    dirlink = Tree(Node(mode=S_IFDIR | 0o755))
    sub = Node(mode=S_IFDIR | 0o755)
    dirlink.root.add(b"d", sub)
    dirlink.root.add(b"l", HardLink(sub))
    with pytest.raises(TreeError):
        write_image(dirlink)
    outside = Tree(Node(mode=S_IFDIR | 0o755))
    outside.root.add(b"l", HardLink(reg(b"elsewhere")))
    with pytest.raises(TreeError):
        write_image(outside)


# -- against the reference implementation (local, where a composefs 1.0.8 build exists) --------

ASSET_VECTORS = {
    # format reference §1.18
    ("special.dump", 0): "d344782ff962ab7d1c5533755c19c5bf3c3485f55bfaf228fc89524c7e2ba61e",
    ("special.dump", 1): "2b1dfb9ffe6938cb3134c339059572e38cbd8cc515d54758fdff55cad5a37427",
    ("config.dump.gz", None): "f93737bda1b19d79c8fe2828615b9dd24e4ec5d97410a1ce6e3716b1a778f00f",
    ("cs9-x86_64-developer.dump.gz", None): (
        "8c61b21852d6abfdd3a7a3da71a5ccb56fae2ad099bebe7d564fcaa842cb9532"
    ),
}


def _asset(name: str) -> bytes:
    assert UPSTREAM
    data = (Path(UPSTREAM) / "tests" / "assets" / name).read_bytes()
    return gzip.decompress(data) if name.endswith(".gz") else data


@needs_upstream
@pytest.mark.parametrize(("asset", "version"), sorted(ASSET_VECTORS, key=str))
def test_format_doc_vectors(asset: str, version: int | None) -> None:
    from csi.image.dump import parse_dump

    kw = {} if version is None else {"min_version": version, "max_version": version}
    image = write_image(parse_dump(_asset(asset)), **kw)
    assert hashlib.sha256(image).hexdigest() == ASSET_VECTORS[(asset, version)]
    if (asset, version) == ("special.dump", 1):
        assert digest_bytes(image).hex() == (
            "1d268f8bc7609b4f8f8467e98565f45300f9e192c0e6ef2d05820d3ea41d4515"
        )


@needs_upstream
def test_every_upstream_asset_matches_mkcomposefs(tmp_path: Path) -> None:
    from csi.image.dump import parse_dump

    assert UPSTREAM
    mk = Path(UPSTREAM) / "build" / "tools" / "mkcomposefs"
    assets = sorted((Path(UPSTREAM) / "tests" / "assets").glob("*.dump*"))
    checked = 0
    for path in assets:
        if path.name.startswith("should-fail") or path.name.endswith(".sha256"):
            continue
        if path.suffix not in (".dump", ".gz"):
            continue
        src = tmp_path / "in.dump"
        src.write_bytes(_asset(path.name))
        ref = tmp_path / "ref.img"
        subprocess.run([mk, "--from-file", src, ref], check=True)
        assert write_image(parse_dump(src.read_bytes())) == ref.read_bytes(), path.name
        checked += 1
    assert checked >= 10


@needs_upstream
def test_random_trees_match_mkcomposefs(tmp_path: Path) -> None:
    from csi.image.dump import format_dump

    assert UPSTREAM
    mk = Path(UPSTREAM) / "build" / "tools" / "mkcomposefs"
    n_trees = int(os.environ.get("CFS_WRITER_RANDOM_TREES", "40"))
    for seed in range(n_trees):
        size = random.Random(seed).choice([3, 40, 400, 1500])
        dump = tmp_path / "t.dump"
        dump.write_bytes(format_dump(tree_random(seed, size), exact=True))
        ref = tmp_path / "ref.img"
        subprocess.run([mk, "--from-file", dump, ref], check=True)
        assert write_image(tree_random(seed, size)) == ref.read_bytes(), seed


def test_very_deep_tree_round_trips() -> None:
    """3000 nested directories: nothing in the tree model, writer, reader or dump recurses."""
    from csi.image.dump import format_dump, parse_dump
    from csi.image.reader import Image

    tree = Tree(Node(mode=S_IFDIR | 0o755))
    node = tree.root
    for _ in range(3000):
        child = Node(mode=S_IFDIR | 0o755)
        node.add(b"d", child)
        node = child
    node.add(b"leaf", reg(b"bottom"))
    image = write_image(tree)
    again = Image(image).to_tree()
    assert write_image(again) == image
    assert write_image(parse_dump(format_dump(again, exact=True))) == image
