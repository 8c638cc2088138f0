"""FUSE inode numbers: stable and collision-free across every view of the node-wide mount.

A FUSE inode number (which pyfuse3 also reports as ``st_ino``) packs three fields::

    bit 63      0
    bits 42..62 view slot   (21 bits) assigned when a view is added, never reused while the
                            daemon runs, so a cached kernel inode can never alias another view
    bits 34..41 layer       ( 8 bits) index of the image in a composition, lowest layer = 0;
                            always 0 for a single-image view
    bits  0..33 nid         (34 bits) the EROFS nid of the inode in that image

So inside a single-image view ``st_ino & NID_MASK`` equals the ``st_ino`` a kernel composefs
mount of the same image shows (the nid), and hardlinks share an inode number exactly as they
do there. In a composition an entry carries the number of the layer it comes from; a merged
directory carries the number of its uppermost layer's directory.

Inode 1 is the mount root (the list of views). Slot 0 is reserved for the single-view mode of
``composefs-csi mount``, where the image root *is* the mount root (inode 1) and every other
inode number is the nid itself: there, ``st_ino`` equals the kernel's for all but the root.
34 bits of nid cover images up to 512 GiB (a nid is a byte offset / 32).
"""

from __future__ import annotations

from typing import Final

ROOT_INO: Final = 1
NID_BITS: Final = 34
LAYER_BITS: Final = 8
SLOT_BITS: Final = 21
NID_MASK: Final = (1 << NID_BITS) - 1
LAYER_MASK: Final = (1 << LAYER_BITS) - 1
SLOT_SHIFT: Final = NID_BITS + LAYER_BITS
MAX_LAYERS: Final = 1 << LAYER_BITS
MAX_SLOT: Final = (1 << SLOT_BITS) - 1


def make_ino(slot: int, layer: int, nid: int) -> int:
    """The inode number of ``nid`` of layer ``layer`` in the view in ``slot``."""
    if not 0 <= nid <= NID_MASK:
        raise ValueError(f"nid {nid} does not fit in {NID_BITS} bits")
    if not 0 <= layer <= LAYER_MASK:
        raise ValueError(f"layer {layer} out of range")
    if not 0 <= slot <= MAX_SLOT:
        raise ValueError(f"view slot {slot} out of range")
    return (slot << SLOT_SHIFT) | (layer << NID_BITS) | nid


def split_ino(ino: int) -> tuple[int, int, int]:
    """``(slot, layer, nid)`` of an inode number made by :func:`make_ino`."""
    return ino >> SLOT_SHIFT, (ino >> NID_BITS) & LAYER_MASK, ino & NID_MASK


def slot_of(ino: int) -> int:
    return ino >> SLOT_SHIFT
