"""Shared test support: kernel composefs mounts, tree snapshots and test-tree generators.

- :mod:`tests.support.kernel`: mount an image the way ``mount.composefs`` does (EROFS +
  overlayfs with a data-only object layer), plain read-only overlay mounts, and probes that
  say why a test must skip.
- :mod:`tests.support.snapshot`: capture everything a user can observe of a mounted or
  on-disk tree, and compare two captures field by field.
- :mod:`tests.support.gentree`: declarative test trees, created on disk and converted to the
  :class:`csi.image.tree.Tree` a scanner is expected to produce.
"""
