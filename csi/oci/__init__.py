"""Importing OCI images and artifacts into a repository (``composefs-csi import``).

Layer of its own above :mod:`csi.repo` (it uses only :mod:`csi.image` and :mod:`csi.repo`):
sources (:mod:`~csi.oci.registry`, :mod:`~csi.oci.layout`, :mod:`~csi.oci.archive`), blob
streams (:mod:`~csi.oci.streams`), the tar reader (:mod:`~csi.oci.tarstream`), the tree rules
(:mod:`~csi.oci.apply`, :mod:`~csi.oci.delta`), objects (:mod:`~csi.oci.objects`) and the
import itself (:mod:`~csi.oci.importer`).
"""
