"""What a volume asks for: ``volume_context`` (pods, PVs) and ``parameters`` (StorageClasses).

Our keys (BRIEF §2.2), validated strictly, since they come from users::

    image:       "sha256:<64 hex>" or a ref name           (exactly one of image / layers)
    layers:      "base:1,patch:3"  several images composed, lowest first
    repository:  the name of an admin-configured repository (default: the configured default)
    fetch:       "eager" (default) | "lazy"

StorageClass parameters may also hold ``imageFromPVCAnnotation: "true"`` (the image comes from
the PVC annotation ``composefs.io/image``, see :mod:`csi.server.k8s`).

Keys with a ``/`` belong to someone else (kubelet's ``csi.storage.k8s.io/pod.name`` and friends,
external-provisioner's ``csi.storage.k8s.io/pvc/name`` and
``storage.kubernetes.io/csiProvisionerIdentity``) and are ignored here, except the pod-info keys
read by :func:`pod_info`. Any other bare key is an error: a typo must not silently give the
default. Pods never give URLs or paths: a repository is only ever a configured name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from csi.fetch.errors import InvalidReference
from csi.fetch.refs import parse_digest, validate_ref_name

from .errors import invalid

IMAGE = "image"
LAYERS = "layers"
REPOSITORY = "repository"
FETCH = "fetch"
IMAGE_FROM_PVC_ANNOTATION = "imageFromPVCAnnotation"

VOLUME_KEYS = frozenset({IMAGE, LAYERS, REPOSITORY, FETCH})
PARAMETER_KEYS = VOLUME_KEYS | {IMAGE_FROM_PVC_ANNOTATION}

K8S_PREFIX = "csi.storage.k8s.io/"
POD_NAME = K8S_PREFIX + "pod.name"
POD_NAMESPACE = K8S_PREFIX + "pod.namespace"
POD_UID = K8S_PREFIX + "pod.uid"
SERVICE_ACCOUNT = K8S_PREFIX + "serviceAccount.name"
EPHEMERAL = K8S_PREFIX + "ephemeral"
SA_TOKENS = K8S_PREFIX + "serviceAccount.tokens"
PVC_NAME = K8S_PREFIX + "pvc/name"
PVC_NAMESPACE = K8S_PREFIX + "pvc/namespace"

#: Most images composed into one volume.
MAX_LAYERS = 32
_REPO_NAME_MAX = 128


@dataclass(frozen=True, slots=True)
class VolumeSpec:
    """What to serve: ``refs`` (lowest layer first) from ``repository`` (None: the default)."""

    refs: tuple[str, ...]
    repository: str | None = None
    lazy: bool = False

    @property
    def fetch_mode(self) -> str:
        return "lazy" if self.lazy else "eager"


@dataclass(frozen=True, slots=True)
class PodInfo:
    name: str = ""
    namespace: str = ""
    uid: str = ""
    service_account: str = ""
    ephemeral: bool = False


def _check_keys(attrs: Mapping[str, str], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(k for k in attrs if "/" not in k and k not in allowed)
    if unknown:
        shown = ", ".join(repr(k[:64]) for k in unknown[:5])
        raise invalid(f"{where}: unknown key(s) {shown}; allowed: {', '.join(sorted(allowed))}")


def _check_ref(ref: str, where: str) -> str:
    try:
        if parse_digest(ref) is None:
            validate_ref_name(ref)
    except InvalidReference as e:
        raise invalid(f"{where}: {e}") from None
    return ref


def parse_refs(attrs: Mapping[str, str], where: str, *, required: bool = True) -> tuple[str, ...]:
    image = attrs.get(IMAGE, "").strip()
    layers = attrs.get(LAYERS, "").strip()
    if image and layers:
        raise invalid(f"{where}: give either {IMAGE!r} or {LAYERS!r}, not both")
    if image:
        return (_check_ref(image, f"{where} {IMAGE!r}"),)
    if layers:
        parts = [p.strip() for p in layers.split(",")]
        if any(not p for p in parts):
            raise invalid(f"{where}: {LAYERS!r} has an empty entry: {layers[:200]!r}")
        if len(parts) > MAX_LAYERS:
            raise invalid(f"{where}: {LAYERS!r} lists {len(parts)} images; at most {MAX_LAYERS}")
        return tuple(_check_ref(p, f"{where} {LAYERS!r}") for p in parts)
    if required:
        raise invalid(f"{where}: {IMAGE!r} (or {LAYERS!r}) is required")
    return ()


def parse_repository(attrs: Mapping[str, str], where: str) -> str | None:
    repo = attrs.get(REPOSITORY, "").strip()
    if not repo:
        return None
    if len(repo) > _REPO_NAME_MAX or any(c in repo for c in "/\\:") or not repo.isprintable():
        raise invalid(f"{where}: {REPOSITORY!r} must be the name of a configured repository")
    return repo


def parse_fetch(attrs: Mapping[str, str], where: str) -> bool:
    """True for lazy."""
    mode = attrs.get(FETCH, "eager").strip().lower() or "eager"
    if mode not in ("eager", "lazy"):
        raise invalid(f"{where}: {FETCH!r} must be 'eager' or 'lazy', not {mode[:32]!r}")
    return mode == "lazy"


def parse_volume_attributes(attrs: Mapping[str, str], where: str = "volume_context") -> VolumeSpec:
    """The spec of a volume from ``volume_context`` (inline volume, static PV, or what
    CreateVolume returned)."""
    _check_keys(attrs, VOLUME_KEYS, where)
    return VolumeSpec(
        refs=parse_refs(attrs, where),
        repository=parse_repository(attrs, where),
        lazy=parse_fetch(attrs, where),
    )


@dataclass(frozen=True, slots=True)
class ProvisionRequest:
    """StorageClass parameters: a spec, or a PVC to read the image annotation from."""

    refs: tuple[str, ...]
    repository: str | None
    lazy: bool
    from_pvc_annotation: bool
    pvc_name: str
    pvc_namespace: str


def _truthy(value: str, key: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "yes", "1"):
        return True
    if v in ("", "false", "no", "0"):
        return False
    raise invalid(f"parameters: {key!r} must be 'true' or 'false', not {value[:32]!r}")


def parse_parameters(params: Mapping[str, str]) -> ProvisionRequest:
    where = "parameters"
    _check_keys(params, PARAMETER_KEYS, where)
    from_pvc = _truthy(params.get(IMAGE_FROM_PVC_ANNOTATION, ""), IMAGE_FROM_PVC_ANNOTATION)
    refs = parse_refs(params, where, required=not from_pvc)
    if from_pvc and not (params.get(PVC_NAME) and params.get(PVC_NAMESPACE)):
        raise invalid(
            f"parameters: {IMAGE_FROM_PVC_ANNOTATION!r} needs {PVC_NAME!r} and {PVC_NAMESPACE!r} "
            "(run external-provisioner with --extra-create-metadata)"
        )
    return ProvisionRequest(
        refs=refs,
        repository=parse_repository(params, where),
        lazy=parse_fetch(params, where),
        from_pvc_annotation=from_pvc,
        pvc_name=params.get(PVC_NAME, ""),
        pvc_namespace=params.get(PVC_NAMESPACE, ""),
    )


def pod_info(attrs: Mapping[str, str]) -> PodInfo:
    """Kubelet's pod-info keys (``podInfoOnMount: true``); absent keys are empty."""
    return PodInfo(
        name=attrs.get(POD_NAME, ""),
        namespace=attrs.get(POD_NAMESPACE, ""),
        uid=attrs.get(POD_UID, ""),
        service_account=attrs.get(SERVICE_ACCOUNT, ""),
        ephemeral=attrs.get(EPHEMERAL, "").strip().lower() == "true",
    )


def spec_context(spec: VolumeSpec, repository: str) -> dict[str, str]:
    """The ``volume_context`` that describes ``spec`` (CreateVolume's answer)."""
    out = {REPOSITORY: repository, FETCH: spec.fetch_mode}
    if len(spec.refs) == 1:
        out[IMAGE] = spec.refs[0]
    else:
        out[LAYERS] = ",".join(spec.refs)
    return out
