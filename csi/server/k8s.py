"""Reading the image of a PVC from its annotation through the Kubernetes API.

Used by CreateVolume when the StorageClass sets ``imageFromPVCAnnotation: "true"`` and
external-provisioner runs with ``--extra-create-metadata`` (so the parameters name the PVC).
The controller's service account needs ``get`` on ``persistentvolumeclaims``.
"""

from __future__ import annotations

from typing import Any

import grpc

from .errors import CsiError, invalid, not_found

IMAGE_ANNOTATION = "composefs.io/image"


class PVCAnnotations:
    """``image(namespace, name)``: the PVC's ``composefs.io/image`` annotation."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._api = client.CoreV1Api(api_client)

    @classmethod
    def in_cluster(cls) -> PVCAnnotations:
        from kubernetes import client, config

        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return cls(client.ApiClient())

    @classmethod
    def for_host(cls, host: str, token: str | None = None) -> PVCAnnotations:
        """A client of the API server at ``host`` (tests; out-of-cluster use)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = host
        if token:
            cfg.api_key = {"authorization": token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        return cls(client.ApiClient(cfg))

    def image(self, namespace: str, name: str) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            pvc = self._api.read_namespaced_persistent_volume_claim(name, namespace)
        except ApiException as e:
            if e.status == 404:
                raise not_found(f"PersistentVolumeClaim {namespace}/{name} not found") from None
            if e.status in (401, 403):
                raise CsiError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"reading PersistentVolumeClaim {namespace}/{name}: HTTP {e.status}",
                ) from None
            raise CsiError(
                grpc.StatusCode.UNAVAILABLE,
                f"reading PersistentVolumeClaim {namespace}/{name}: HTTP {e.status}",
            ) from None
        except OSError as e:
            raise CsiError(
                grpc.StatusCode.UNAVAILABLE, f"Kubernetes API unreachable: {e}"
            ) from None
        annotations = (pvc.metadata.annotations if pvc.metadata else None) or {}
        value = annotations.get(IMAGE_ANNOTATION, "").strip()
        if not value:
            raise invalid(
                f"PersistentVolumeClaim {namespace}/{name} has no {IMAGE_ANNOTATION!r} annotation"
            )
        return str(value)
