"""One layer as its own image (``--layers``): what the layer changed, in overlay form.

Stacked lowest first (by overlayfs over kernel composefs mounts, or by our compositions), the
layer images show exactly the flattened tree :class:`~csi.oci.apply.Applier` built. Made from
the flattened tree after the layer and the layer's :class:`~csi.oci.apply.LayerChanges`:

- a directory the layer changed (or changed something below) is in the image with its
  current metadata, so it merges with the one below and wins its attributes;
- a name the layer placed is in the image (a new inode, or a copy of an older inode the
  layer hard-linked to: an overlay layer cannot share an inode with the layers below it);
- a name the layer removed becomes an overlay whiteout (a character device 0/0);
- a directory made opaque (``.wh..wh..opq``), or created again where a lower directory was
  removed, gets ``trusted.overlay.opaque=y``; everything below it is in the image.
"""

from __future__ import annotations

from dataclasses import replace

from csi.image.tree import S_IFCHR, S_IFDIR, Node, Tree

from .apply import LayerChanges, finish_tree

OVERLAY_OPAQUE = b"trusted.overlay.opaque"


def whiteout_node() -> Node:
    return Node(mode=S_IFCHR, rdev=0)


def _copy(n: Node) -> Node:
    """A new inode with ``n``'s metadata and content (no entries, one link)."""
    return replace(n, nlink=1, xattrs=dict(n.xattrs), entries=None)


def _dir_copy(d: Node) -> Node:
    """A new directory with ``d``'s owner, mode, times and xattrs (and no entries)."""
    return replace(_copy(d), size=0, rdev=0, payload=None, content=None, digest=None)


def layer_tree(root: Node, ch: LayerChanges) -> Tree:
    """The image tree of the layer whose changes are ``ch`` (``root``: the flattened tree
    right after that layer; it is not modified)."""
    copies: dict[int, Node] = {}
    out_root = _dir_copy(root)
    if id(root) in ch.opaque:
        out_root.xattrs[OVERLAY_OPAQUE] = b"y"
    # (source dir, its copy in the layer image, complete: everything below goes in)
    stack = [(root, out_root, id(root) in ch.opaque)]
    while stack:
        d, out, complete = stack.pop()
        assert d.entries is not None and out.entries is not None
        did = id(d)
        added = ch.added.get(did, set())
        removed = ch.removed.get(did, {})
        for name, entry in d.entries.items():
            assert isinstance(entry, Node)
            cid = id(entry)
            if entry.is_dir:
                born = cid in ch.born
                if not (complete or born or cid in ch.dirty):
                    continue
                sub = _dir_copy(entry)
                opaque = cid in ch.opaque or (born and removed.get(name, False))
                if opaque:
                    sub.xattrs[OVERLAY_OPAQUE] = b"y"
                out.entries[name] = sub
                stack.append((entry, sub, complete or born or opaque))
            elif complete or name in added:
                # One copy per inode: its names in this layer stay hard links of each other.
                # (An older inode the layer hard-linked to gets a copy of its own here.)
                copy = copies.get(cid)
                if copy is None:
                    copy = copies[cid] = _copy(entry)
                out.entries[name] = copy
        if not complete:
            for name in removed:
                if name not in d.entries:
                    out.entries[name] = whiteout_node()
    return finish_tree(out_root)


def empty_layer_tree() -> Tree:
    return Tree(Node(mode=S_IFDIR | 0o755))
