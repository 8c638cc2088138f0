"""A pod spec, translated into what podman needs to run its containers the way kubelet would.

Everything comes from the spec: privileges and the security context, hostPath volumes (mapped
under the host directory that stands in for the node's ``/``) with their type checks,
``mountPropagation`` (None -> rprivate, HostToContainer -> rslave, Bidirectional -> rshared),
emptyDir volumes (``medium: Memory`` -> a tmpfs of ``sizeLimit``), ConfigMap volumes (files
written as kubelet writes them, ``subPath`` bound as a file), CSI and PVC volumes (the targets the
fake kubelet published), command and args with ``$(VAR)`` expansion, env with ``fieldRef``
(``spec.nodeName`` is the node the harness plays), resources, ``terminationGracePeriodSeconds``.

A field the translation does not know raises :class:`UnsupportedSpec` naming it, so a chart
change never goes untested silently. Fields that only matter to parts of Kubernetes the harness
does not have are ignored on purpose and listed in :data:`IGNORED_POD_FIELDS` and
:data:`IGNORED_CONTAINER_FIELDS` (scheduling, image pulls, probes: the fake kubelet runs the
readiness probes itself, :mod:`tests.e2e.node`).

This module only computes; :mod:`tests.e2e.node` creates directories, mounts and containers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Doc = dict[str, Any]

PROPAGATION = {"None": "rprivate", "HostToContainer": "rslave", "Bidirectional": "rshared"}

IGNORED_POD_FIELDS = frozenset(
    {
        # Scheduling: there is one node, and it is this one.
        "nodeSelector",
        "tolerations",
        "affinity",
        "priorityClassName",
        # No API server: no service account token is mounted (the node pods set
        # automountServiceAccountToken: false anyway), no image pull secrets (no registry).
        "serviceAccountName",
        "serviceAccount",
        "automountServiceAccountToken",
        "imagePullSecrets",
        "dnsPolicy",
        "restartPolicy",  # the fake kubelet restarts containers itself
    }
)
IGNORED_CONTAINER_FIELDS = frozenset(
    {
        "imagePullPolicy",  # images are local (podman run --pull never)
        "ports",  # pod network: every pod has its own address (container IP)
        "livenessProbe",  # run by the fake kubelet where it can (node.py), else reported
        "readinessProbe",
        "startupProbe",
        "terminationMessagePath",
        "terminationMessagePolicy",
    }
)
_POD_FIELDS = frozenset(
    {
        "containers",
        "volumes",
        "securityContext",
        "terminationGracePeriodSeconds",
        "hostNetwork",
        "hostPID",
        "hostIPC",
    }
)
_CONTAINER_FIELDS = frozenset(
    {
        "name",
        "image",
        "command",
        "args",
        "env",
        "workingDir",
        "securityContext",
        "volumeMounts",
        "resources",
    }
)
_MOUNT_FIELDS = frozenset({"name", "mountPath", "subPath", "readOnly", "mountPropagation"})
_SECURITY_FIELDS = frozenset(
    {
        "privileged",
        "runAsUser",
        "runAsGroup",
        "runAsNonRoot",
        "readOnlyRootFilesystem",
        "allowPrivilegeEscalation",
        "capabilities",
        "seccompProfile",
        "fsGroup",
        "supplementalGroups",
        "seLinuxOptions",
    }
)
_HOSTPATH_TYPES = frozenset(
    {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice",
     "BlockDevice"}
)  # fmt: skip


class UnsupportedSpec(ValueError):
    """The spec asks for something the harness cannot do faithfully."""


@dataclass(frozen=True)
class Pod:
    """A pod as kubelet knows it: identity and spec."""

    name: str
    namespace: str
    uid: str
    spec: Doc
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeLayout:
    """Where the node's paths are on this machine: ``root`` stands in for the node's ``/``."""

    root: Path
    name: str
    kubelet_dir: str = "/var/lib/kubelet"

    def host(self, node_path: str) -> Path:
        """The host path of a node path. Device nodes are the machine's own (the stand-in root
        is a directory tree, not a devtmpfs)."""
        if not node_path.startswith("/"):
            raise UnsupportedSpec(f"hostPath {node_path!r} is not absolute")
        norm = str(Path(node_path))
        if norm == "/dev" or norm.startswith("/dev/"):
            return Path(norm)
        return self.root / norm.lstrip("/")

    def pod_dir(self, uid: str) -> Path:
        return self.host(f"{self.kubelet_dir}/pods/{uid}")


@dataclass
class VolumePlan:
    """What kubelet does on the host for one volume of a pod, before its containers start."""

    name: str
    kind: str  # hostPath, emptyDir, configMap, csi, persistentVolumeClaim
    host: Path
    hostpath_type: str = ""
    tmpfs: bool = False  # emptyDir medium: Memory
    tmpfs_bytes: int | None = None  # its sizeLimit (None: the kernel's default size)
    files: dict[str, tuple[str, int]] = field(
        default_factory=dict
    )  # configMap: path -> (text, mode)


@dataclass
class ContainerPlan:
    name: str
    image: str
    args: list[str]  # for `podman run -d <args>`

    def describe(self) -> str:
        return "podman run -d " + " ".join(_quote(a) for a in self.args)


@dataclass
class PodPlan:
    pod: Pod
    volumes: dict[str, VolumePlan]
    containers: dict[str, ContainerPlan]
    skipped: dict[str, str]  # container -> why it does not run
    grace_seconds: int


# -- values -------------------------------------------------------------------------------------

_MEM = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6,
        "G": 10**9, "T": 10**12, "": 1}  # fmt: skip
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?")


def memory_bytes(q: str | int) -> int:
    m = _QUANTITY.fullmatch(str(q))
    if not m or m.group(2) == "m":
        raise UnsupportedSpec(f"memory quantity {q!r}")
    return int(float(m.group(1)) * _MEM[m.group(2) or ""])


def cpu_millis(q: str | int | float) -> int:
    m = _QUANTITY.fullmatch(str(q))
    if not m or m.group(2) not in (None, "m"):
        raise UnsupportedSpec(f"cpu quantity {q!r}")
    value = float(m.group(1))
    return int(value) if m.group(2) == "m" else int(value * 1000)


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are replaced, undefined references
    stay as written, ``$$`` is a literal ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _REF.sub(sub, text)


def _quote(s: str) -> str:
    return s if re.fullmatch(r"[A-Za-z0-9_./:=,@%+-]+", s) else "'" + s.replace("'", "'\\''") + "'"


def _check_fields(obj: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise UnsupportedSpec(f"{what}: unsupported field(s) {unknown}")


# -- volumes ------------------------------------------------------------------------------------


def plan_volumes(
    pod: Pod,
    node: NodeLayout,
    configmaps: Mapping[str, Mapping[str, str]],
    published: Mapping[str, Path],
) -> dict[str, VolumePlan]:
    """Every volume of the pod (kubelet sets up all of them before any container starts).
    ``published``: volume name -> host path of the target the fake kubelet published (CSI and
    PVC volumes)."""
    plans: dict[str, VolumePlan] = {}
    vol_root = node.pod_dir(pod.uid) / "volumes"
    for vol in pod.spec.get("volumes") or []:
        name = vol["name"]
        kinds = sorted(set(vol) - {"name"})
        if len(kinds) != 1:
            raise UnsupportedSpec(f"volume {name}: expected one source, got {kinds}")
        kind = kinds[0]
        src = vol[kind] or {}
        if kind == "hostPath":
            htype = src.get("type", "")
            if htype not in _HOSTPATH_TYPES:
                raise UnsupportedSpec(f"volume {name}: hostPath type {htype!r}")
            plans[name] = VolumePlan(name, kind, node.host(src["path"]), hostpath_type=htype)
        elif kind == "emptyDir":
            _check_fields(src, frozenset({"medium", "sizeLimit"}), f"volume {name} emptyDir")
            medium = src.get("medium", "")
            if medium not in ("", "Memory"):
                raise UnsupportedSpec(f"volume {name}: emptyDir medium {medium!r}")
            size = memory_bytes(src["sizeLimit"]) if "sizeLimit" in src else None
            plans[name] = VolumePlan(
                name,
                kind,
                vol_root / "kubernetes.io~empty-dir" / name,
                tmpfs=medium == "Memory",
                tmpfs_bytes=size,
            )
        elif kind == "configMap":
            plans[name] = _configmap(name, src, configmaps, vol_root)
        elif kind in ("csi", "persistentVolumeClaim"):
            if name not in published:
                raise UnsupportedSpec(f"volume {name}: {kind} volume was not published")
            plans[name] = VolumePlan(name, kind, published[name])
        else:
            raise UnsupportedSpec(f"volume {name}: {kind} volumes are not supported")
    return plans


def _configmap(
    name: str, src: Doc, configmaps: Mapping[str, Mapping[str, str]], vol_root: Path
) -> VolumePlan:
    _check_fields(
        src, frozenset({"name", "items", "defaultMode", "optional"}), f"volume {name} configMap"
    )
    data = configmaps.get(src["name"])
    if data is None:
        if src.get("optional"):
            data = {}
        else:
            raise UnsupportedSpec(f"volume {name}: ConfigMap {src['name']} is not in the chart")
    mode = int(src.get("defaultMode", 0o644))
    files: dict[str, tuple[str, int]] = {}
    if "items" in src:
        for item in src["items"]:
            if item["key"] not in data:
                raise UnsupportedSpec(f"volume {name}: key {item['key']} not in {src['name']}")
            files[item["path"]] = (data[item["key"]], int(item.get("mode", mode)))
    else:
        files = {k: (v, mode) for k, v in data.items()}
    return VolumePlan(name, "configMap", vol_root / "kubernetes.io~configmap" / name, files=files)


# -- containers ---------------------------------------------------------------------------------


def _security(pod_sc: Doc, sc: Doc, what: str) -> list[str]:
    _check_fields(pod_sc, _SECURITY_FIELDS, f"{what}: pod securityContext")
    _check_fields(sc, _SECURITY_FIELDS, f"{what}: securityContext")
    merged = {**pod_sc, **sc}
    args: list[str] = []
    privileged = bool(sc.get("privileged"))
    if privileged:
        args.append("--privileged")
    user = merged.get("runAsUser")
    group = merged.get("runAsGroup")
    if merged.get("runAsNonRoot") and user == 0:
        raise UnsupportedSpec(f"{what}: runAsNonRoot with runAsUser 0 (kubelet refuses it)")
    if user is not None:
        args += ["--user", f"{int(user)}" + (f":{int(group)}" if group is not None else "")]
    elif group is not None:
        raise UnsupportedSpec(f"{what}: runAsGroup without runAsUser")
    for g in [pod_sc.get("fsGroup"), *(pod_sc.get("supplementalGroups") or [])]:
        if g is not None:
            args += ["--group-add", str(int(g))]
    if sc.get("readOnlyRootFilesystem"):
        # Kubernetes adds no tmpfs of its own on /run, /tmp and /var/tmp (podman would).
        args += ["--read-only", "--read-only-tmpfs=false"]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    caps = sc.get("capabilities") or {}
    _check_fields(caps, frozenset({"add", "drop"}), f"{what}: capabilities")
    for c in caps.get("drop") or []:
        args += ["--cap-drop", str(c)]
    for c in caps.get("add") or []:
        args += ["--cap-add", str(c)]
    seccomp = merged.get("seccompProfile") or {}
    stype = seccomp.get("type", "RuntimeDefault")
    if stype == "Unconfined" and not privileged:
        args += ["--security-opt", "seccomp=unconfined"]
    elif stype not in ("RuntimeDefault", "Unconfined"):
        raise UnsupportedSpec(f"{what}: seccompProfile {stype}")
    selinux = merged.get("seLinuxOptions") or {}
    for key in ("user", "role", "type", "level"):
        if key in selinux:
            args += ["--security-opt", f"label={key}:{selinux[key]}"]
    return args


def _env(pod: Pod, container: Doc, node: NodeLayout, what: str) -> dict[str, str]:
    env: dict[str, str] = {}
    fields = {
        "metadata.name": pod.name,
        "metadata.namespace": pod.namespace,
        "metadata.uid": pod.uid,
        "spec.nodeName": node.name,
        "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
    }
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
        elif "valueFrom" in item and "fieldRef" in item["valueFrom"]:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            if path not in fields:
                raise UnsupportedSpec(f"{what}: env {name}: fieldRef {path}")
            env[name] = fields[path]
        else:
            raise UnsupportedSpec(f"{what}: env {name}: {sorted(item.get('valueFrom', {}))}")
    return env


def _resources(res: Doc, what: str) -> list[str]:
    _check_fields(res, frozenset({"limits", "requests"}), f"{what}: resources")
    args: list[str] = []
    limits = res.get("limits") or {}
    requests = res.get("requests") or {}
    if "memory" in limits:
        mem = memory_bytes(limits["memory"])
        args += ["--memory", str(mem), "--memory-swap", str(mem)]  # Kubernetes: no swap
    if "cpu" in limits:
        args += ["--cpus", f"{cpu_millis(limits['cpu']) / 1000:g}"]
    if "cpu" in requests:
        # kubelet's mapping of a CPU request to cgroup shares.
        args += ["--cpu-shares", str(max(2, cpu_millis(requests["cpu"]) * 1024 // 1000))]
    return args


def _mounts(
    container: Doc, volumes: Mapping[str, VolumePlan], privileged: bool, what: str
) -> list[str]:
    args: list[str] = []
    for vm in container.get("volumeMounts") or []:
        _check_fields(vm, _MOUNT_FIELDS, f"{what}: volumeMount {vm.get('name')}")
        plan = volumes.get(vm["name"])
        if plan is None:
            raise UnsupportedSpec(f"{what}: volumeMount of unknown volume {vm['name']}")
        source = plan.host / vm["subPath"] if vm.get("subPath") else plan.host
        prop = vm.get("mountPropagation", "None")
        if prop not in PROPAGATION:
            raise UnsupportedSpec(f"{what}: mountPropagation {prop!r}")
        if prop == "Bidirectional" and not privileged:
            raise UnsupportedSpec(f"{what}: Bidirectional propagation needs a privileged container")
        opts = [
            "type=bind",
            f"source={source}",
            f"destination={vm['mountPath']}",
            f"bind-propagation={PROPAGATION[prop]}",
        ]
        if vm.get("readOnly"):
            opts.append("ro=true")
        if any("," in o for o in opts):
            raise UnsupportedSpec(f"{what}: a path with a comma: {opts}")
        args += ["--mount", ",".join(opts)]
    return args


def plan_container(
    pod: Pod,
    container: Doc,
    volumes: Mapping[str, VolumePlan],
    node: NodeLayout,
    *,
    container_name: str,
    labels: Mapping[str, str],
) -> ContainerPlan:
    what = f"pod {pod.name} container {container['name']}"
    _check_fields(container, _CONTAINER_FIELDS | IGNORED_CONTAINER_FIELDS, what)
    spec = pod.spec
    sc = container.get("securityContext") or {}
    args = ["--name", container_name, "--hostname", pod.name[:63]]
    for k, v in labels.items():
        args += ["--label", f"{k}={v}"]
    # kubelet ignores an image's HEALTHCHECK; images are local.
    args += ["--no-healthcheck", "--pull", "never"]
    args += ["--stop-timeout", str(int(spec.get("terminationGracePeriodSeconds", 30)))]
    if spec.get("hostNetwork"):
        args += ["--network", "host"]
    if spec.get("hostPID"):
        args += ["--pid", "host"]
    if spec.get("hostIPC"):
        args += ["--ipc", "host"]
    args += _security(spec.get("securityContext") or {}, sc, what)
    args += _resources(container.get("resources") or {}, what)
    env = _env(pod, container, node, what)
    for k, v in env.items():
        args += ["--env", f"{k}={v}"]
    args += _mounts(container, volumes, bool(sc.get("privileged")), what)
    if container.get("workingDir"):
        args += ["--workdir", container["workingDir"]]
    command = [expand(str(c), env) for c in container.get("command") or []]
    if command:
        args += ["--entrypoint", json.dumps(command)]
    args.append(container["image"])
    args += [expand(str(a), env) for a in container.get("args") or []]
    return ContainerPlan(container["name"], container["image"], args)


def plan_pod(
    pod: Pod,
    node: NodeLayout,
    configmaps: Mapping[str, Mapping[str, str]],
    *,
    run_id: str,
    label: str,
    available: Any,
    published: Mapping[str, Path] | None = None,
    name_prefix: str = "cfs-e2e",
) -> PodPlan:
    """The whole pod. ``available(image) -> bool``: containers whose image is not on this
    machine (the CSI sidecars: no registry) are skipped and listed in ``skipped``."""
    spec = pod.spec
    _check_fields(spec, _POD_FIELDS | IGNORED_POD_FIELDS, f"pod {pod.name}")
    if spec.get("initContainers"):
        raise UnsupportedSpec(f"pod {pod.name}: initContainers")
    volumes = plan_volumes(pod, node, configmaps, published or {})
    containers: dict[str, ContainerPlan] = {}
    skipped: dict[str, str] = {}
    labels = {
        label: run_id,
        "io.composefs-csi.e2e-pod": pod.name,
        "io.composefs-csi.e2e-uid": pod.uid,
    }
    for c in spec["containers"]:
        if not available(c["image"]):
            skipped[c["name"]] = f"image {c['image']} is not on this machine (no registry)"
            continue
        cname = f"{name_prefix}-{run_id}-{pod.name}-{c['name']}"
        containers[c["name"]] = plan_container(
            pod, c, volumes, node, container_name=cname, labels=labels
        )
    return PodPlan(
        pod, volumes, containers, skipped, int(spec.get("terminationGracePeriodSeconds", 30))
    )


def host_path_in(plan: PodPlan, container: str, path: str) -> Path:
    """Where a path inside ``container`` of the pod is on the host, through its volume mounts
    (the deepest mount containing it); ``UnsupportedSpec`` if it is in the container's own
    filesystem."""
    doc = next(c for c in plan.pod.spec["containers"] if c["name"] == container)
    best: tuple[int, Path] | None = None
    for vm in doc.get("volumeMounts") or []:
        mp = vm["mountPath"].rstrip("/") or "/"
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            base = plan.volumes[vm["name"]].host
            if vm.get("subPath"):
                base = base / vm["subPath"]
            rest = path[len(mp) :].lstrip("/")
            if best is None or len(mp) > best[0]:
                best = (len(mp), base / rest if rest else base)
    if best is None:
        raise UnsupportedSpec(f"{path} is not on a volume of container {container}")
    return best[1]
