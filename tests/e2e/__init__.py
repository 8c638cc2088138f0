"""The container end-to-end harness (``make e2e``, ``python -m tests.e2e``).

The project's image is built with podman, the chart is rendered, and the driver's pods run as
podman containers with exactly what the rendered pod specs say, on a host directory standing in
for a node's ``/``. A fake kubelet (:mod:`tests.e2e.kubelet`) calls the node plugin's socket and
runs "pod" containers that read the published volumes. See docs/e2e.md.

Modules, one job each: :mod:`.podman` (running podman), :mod:`.baseimage` and :mod:`.build`
(images), :mod:`.chart` (rendering), :mod:`.podspec` (pod spec -> ``podman run``),
:mod:`.node` (the stand-in node and its pods), :mod:`.kubelet` (kubelet's CSI calls),
:mod:`.provisioner` (csi-provisioner's CreateVolume), :mod:`.repo` (trees, repository, nginx),
:mod:`.reader` (the program the pods run), :mod:`.scenarios` and :mod:`.__main__`.
"""
