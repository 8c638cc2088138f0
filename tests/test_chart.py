"""The Helm chart (charts/composefs-csi), the rendered manifests/ and the Grafana dashboard.

Rendering uses ``chart-render`` (a ``helm template`` work-alike) from ``<repo>/../shared/tools/bin``
or ``$CHART_RENDER``; the tests that need it skip when it is absent. Every rendered object is
checked with ``kubernetes-validate --strict`` (in-process) against Kubernetes 1.30 and the newest
version the package knows; the Prometheus operator objects, whose schemas it does not have, are
checked structurally here. The configuration the chart renders is parsed by the driver's own
loader (:func:`csi.config.config_from_dict`), and the dashboard and alert queries may only use
metric names the code registers in :data:`csi.metrics.REGISTRY`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from csi.config import config_from_dict, parse_size

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "composefs-csi"
DASHBOARD = CHART / "dashboards" / "composefs-csi.json"
MANIFESTS = REPO / "manifests"
OPERATOR_API = "monitoring.coreos.com/v1"
DRIVER = "csi.composefs.io"
# The release name and namespace scripts/render-manifests.sh uses for manifests/.
MANIFEST_RELEASE = "composefs-csi"
MANIFEST_NAMESPACE = "composefs-csi"

Doc = dict[str, Any]


def _renderer() -> Path | None:
    env = os.environ.get("CHART_RENDER")
    if env:
        return Path(env) if Path(env).is_file() else None
    path = REPO.parent / "shared" / "tools" / "bin" / "chart-render"
    if path.is_file():
        return path
    found = shutil.which("chart-render")
    return Path(found) if found else None


RENDERER = _renderer()
needs_renderer = pytest.mark.skipif(
    RENDERER is None,
    reason="chart-render not found (expected at ../shared/tools/bin/chart-render relative to "
    "the repository root, on PATH, or in $CHART_RENDER)",
)


class RenderError(Exception):
    pass


def render_text(
    values: dict[str, Any] | None = None,
    *,
    api_versions: tuple[str, ...] = (),
    kube_version: str | None = None,
    release: str = "cfs",
    namespace: str = "storage",
    tmp_dir: Path | None = None,
) -> str:
    assert RENDERER is not None
    args = [str(RENDERER), "--name", release, "--namespace", namespace]
    for api in api_versions:
        args += ["--api-versions", api]
    if kube_version:
        args += ["--kube-version", kube_version]
    if values is not None:
        assert tmp_dir is not None
        vf = tmp_dir / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
        vf.write_text(yaml.safe_dump(values))
        args += ["-f", str(vf)]
    args.append(str(CHART))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip() or proc.stdout.strip())
    return proc.stdout


def parse_docs(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name_suffix: str = "") -> Doc:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {len(found)}"
    return found[0]


def container(pod_owner: Doc, name: str) -> Doc:
    cs = pod_owner["spec"]["template"]["spec"]["containers"]
    found: list[Doc] = [c for c in cs if c["name"] == name]
    assert found, f"no container {name} in {pod_owner['metadata']['name']}"
    return found[0]


def pod_spec(owner: Doc) -> Doc:
    spec: Doc = owner["spec"]["template"]["spec"]
    return spec


# -- the option matrix --------------------------------------------------------------------------

MONITORING_ON: dict[str, Any] = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
        "podMonitor": {"enabled": True},
    },
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
}

REPOS_WITH_AUTH: dict[str, Any] = {
    "repositories": [
        {
            "name": "models",
            "urls": ["https://cdn.example.net/models/", "https://mirror.example.org/models/"],
            "auth": {"type": "bearer", "secretName": "models-token", "tokenKey": "jwt"},
            "caBundle": {"configMapName": "corp-ca", "key": "bundle.pem"},
            "concurrency": 32,
            "timeouts": {"connect": 5, "read": 20, "total": 300},
            "retries": {"maxAttempts": 3},
        },
        {
            "name": "internal",
            "urls": ["https://repo.internal.example/"],
            "auth": {"type": "basic", "secretName": "internal-auth", "username": "reader"},
            "caBundle": {"secretName": "internal-ca"},
            "clientCertificate": {"secretName": "internal-client-tls"},
        },
        {"name": "lab", "urls": ["http://10.0.0.5:8080/repo/"], "allowPlainHttp": True},
        {"name": "local", "urls": ["file:///srv/composefs/"]},
    ],
    "defaultRepository": "internal",
}

PVC_ANNOTATION: dict[str, Any] = {
    "controller": {"imageFromPVCAnnotation": True},
    "storageClasses": [
        {"name": "composefs-annotated", "parameters": {"imageFromPVCAnnotation": "true"}},
        {
            "name": "composefs-tools",
            "parameters": {"layers": "base:1,tools:3", "fetch": "lazy", "repository": "default"},
            "reclaimPolicy": "Retain",
        },
    ],
}

CASES: dict[str, tuple[dict[str, Any] | None, tuple[str, ...]]] = {
    "default": (None, ()),
    "default-with-operator-api": (None, (OPERATOR_API,)),
    "monitoring-with-operator": (MONITORING_ON, (OPERATOR_API,)),
    "monitoring-without-operator": (MONITORING_ON, ()),
    "monitoring-off": (
        {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
        (OPERATOR_API,),
    ),
    "pvc-annotation": (PVC_ANNOTATION, ()),
    "repositories-auth-ca": ({**REPOS_WITH_AUTH, **MONITORING_ON}, (OPERATOR_API,)),
    "store-size-decimal": ({"store": {"sizeCap": "200G"}, **MONITORING_ON}, (OPERATOR_API,)),
    "store-size-bytes": ({"store": {"sizeCap": 10737418240}}, ()),
    "store-uncapped": ({"store": {"sizeCap": ""}, **MONITORING_ON}, (OPERATOR_API,)),
    "no-controller": ({"controller": {"enabled": False}}, ()),
    "custom-paths": (
        {
            "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet/",
            "dataDir": "/mnt/fast/composefs",
            "dataplane": {"updateStrategy": {"type": "RollingUpdate"}},
            "node": {"seLinuxOptions": {"type": "super_t"}, "tolerateAllTaints": False},
            "verbosity": 2,
        },
        (),
    ),
}


@functools.cache
def _render_case(name: str, tmp: str) -> list[Doc]:
    values, apis = CASES[name]
    return parse_docs(render_text(values, api_versions=apis, tmp_dir=Path(tmp)))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    if RENDERER is None:
        pytest.skip("chart-render not found")
    tmp = str(tmp_path_factory.mktemp("chart"))
    return {name: _render_case(name, tmp) for name in CASES}


def driver_config(docs: list[Doc], key: str = "config.yaml") -> Doc:
    cm = one(docs, "ConfigMap", "-config")
    cfg: Doc = yaml.safe_load(cm["data"][key])
    return cfg


# -- Kubernetes schemas ------------------------------------------------------------------------


def _k8s_versions() -> tuple[str, str]:
    kv = pytest.importorskip("kubernetes_validate")
    return "1.30.0", str(kv.latest_version())


def _validate_all(docs: Iterator[Doc]) -> list[str]:
    """kubernetes-validate --strict for 1.30 and the newest version; objects whose schema the
    package lacks are returned as "NOSCHEMA kind" so the caller can check them itself."""
    import kubernetes_validate as kv  # type: ignore[import-untyped]
    from kubernetes_validate.utils import SchemaNotFoundError  # type: ignore[import-untyped]

    problems: list[str] = []
    for doc in docs:
        for version in _k8s_versions():
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                problems.append(
                    f"{version} {doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}"
                )
            except SchemaNotFoundError:
                problems.append(f"NOSCHEMA {doc['apiVersion']} {doc['kind']}")
                break
    return problems


@needs_renderer
def test_every_rendered_object_passes_kubernetes_validate_strict(
    rendered: dict[str, list[Doc]],
) -> None:
    seen: dict[str, Doc] = {}
    for docs in rendered.values():
        for d in docs:
            seen.setdefault(json.dumps(d, sort_keys=True), d)
    problems = _validate_all(iter(seen.values()))
    errors = [p for p in problems if not p.startswith("NOSCHEMA")]
    assert not errors, "\n".join(errors)
    # Only the Prometheus operator's kinds may lack a schema (they are checked below).
    noschema = {p.split()[1] for p in problems if p.startswith("NOSCHEMA")}
    assert noschema <= {OPERATOR_API}


def test_validation_catches_a_bad_object() -> None:
    """The validator used above is strict: an unknown field and a wrong type both fail."""
    pytest.importorskip("kubernetes_validate")
    ds: Doc = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", "mountPropagation": "x"}]},
            },
        },
    }
    assert any("mountPropagation" in p for p in _validate_all(iter([ds])))
    bad_type = copy.deepcopy(ds)
    del bad_type["spec"]["template"]["spec"]["containers"][0]["mountPropagation"]
    bad_type["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": "80"}]
    assert any("containerPort" in p for p in _validate_all(iter([bad_type])))


# -- what the default install contains ---------------------------------------------------------


@needs_renderer
def test_default_render_objects(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["default"]
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == sorted(
        [
            "CSIDriver/csi.composefs.io",
            "ConfigMap/cfs-composefs-csi-config",
            "ServiceAccount/cfs-composefs-csi-node",
            "ServiceAccount/cfs-composefs-csi-controller",
            "ClusterRole/cfs-composefs-csi-provisioner",
            "ClusterRoleBinding/cfs-composefs-csi-provisioner",
            "Role/cfs-composefs-csi-leader-election",
            "RoleBinding/cfs-composefs-csi-leader-election",
            "DaemonSet/cfs-composefs-csi-dataplane",
            "DaemonSet/cfs-composefs-csi-node",
            "Deployment/cfs-composefs-csi-controller",
            "Service/cfs-composefs-csi-node-metrics",
            "Service/cfs-composefs-csi-dataplane-metrics",
            "Service/cfs-composefs-csi-controller-metrics",
        ]
    )
    for d in docs:
        if d["kind"] not in ("CSIDriver", "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == "storage", d["metadata"]["name"]


@needs_renderer
def test_csidriver(rendered: dict[str, list[Doc]]) -> None:
    spec = one(rendered["default"], "CSIDriver")["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert spec["volumeLifecycleModes"] == ["Ephemeral", "Persistent"]
    assert spec["fsGroupPolicy"] == "None"
    assert spec["requiresRepublish"] is True


def _mounts(c: Doc) -> dict[str, Doc]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def _volume(owner: Doc, name: str) -> Doc:
    vols: dict[str, Doc] = {v["name"]: v for v in pod_spec(owner)["volumes"]}
    return vols[name]


@needs_renderer
def test_node_plugin_daemonset(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["default"]
    ds = one(docs, "DaemonSet", "-node")
    spec = pod_spec(ds)
    assert [c["name"] for c in spec["containers"]] == [
        "plugin",
        "node-driver-registrar",
        "liveness-probe",
    ]
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["automountServiceAccountToken"] is False
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"

    plugin = container(ds, "plugin")
    assert plugin["securityContext"]["privileged"] is True
    assert plugin["args"][-4:] == [
        "node",
        "--config=/etc/composefs-csi/config.yaml",
        "--endpoint=unix:///csi/csi.sock",
        "--node-id=$(NODE_NAME)",
    ]
    assert plugin["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = _mounts(plugin)
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    assert mounts["/var/lib/composefs-csi"]["mountPropagation"] == "HostToContainer"
    assert "/run/composefs-csi" in mounts
    assert mounts["/csi"]["name"] == "socket-dir"
    assert _volume(ds, "socket-dir")["hostPath"]["path"] == f"/var/lib/kubelet/plugins/{DRIVER}"
    assert plugin["resources"]["requests"]["memory"]
    # Liveness: the sidecar turns CSI Probe into /healthz on the port the plugin's probe uses.
    probe_port = plugin["livenessProbe"]["httpGet"]["port"]
    port = next(p["containerPort"] for p in plugin["ports"] if p["name"] == probe_port)
    lp = container(ds, "liveness-probe")
    assert f"--http-endpoint=:{port}" in lp["args"]
    assert "--csi-address=/csi/csi.sock" in lp["args"]

    reg = container(ds, "node-driver-registrar")
    assert f"--kubelet-registration-path=/var/lib/kubelet/plugins/{DRIVER}/csi.sock" in reg["args"]
    assert _mounts(reg)["/registration"]["name"] == "registration-dir"
    assert (
        _volume(ds, "registration-dir")["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry"
    )
    for sidecar in (reg, lp):
        assert sidecar["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert not sidecar["securityContext"].get("privileged")
    # Every port in the pod is distinct (all containers share the pod's network namespace).
    ports = [p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])]
    ports += [
        int(a.rsplit(":", 1)[1])
        for c in spec["containers"]
        for a in c.get("args", [])
        if a.startswith("--http-endpoint=")
    ]
    assert len(set(ports)) == len({(p) for p in ports}) and len(set(ports)) >= 3


@needs_renderer
def test_dataplane_daemonset_is_separate_and_not_rolled(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["default"]
    dp = one(docs, "DaemonSet", "-dataplane")
    node = one(docs, "DaemonSet", "-node")
    assert dp["spec"]["updateStrategy"] == {"type": "OnDelete"}
    c = container(dp, "dataplane")
    assert c["args"][-2:] == ["dataplane", "--config=/etc/composefs-csi/config.yaml"]
    assert c["securityContext"]["privileged"] is True
    assert "livenessProbe" not in c  # a restart would break every volume on the node
    # The data directory (store and FUSE mountpoint), not the mountpoint itself: the FUSE
    # mount reaches the host from the data plane (Bidirectional) and the node plugin sees it,
    # and its replacement after a restart, from the host (HostToContainer).
    assert _mounts(c)["/var/lib/composefs-csi"]["mountPropagation"] == "Bidirectional"
    plugin = container(node, "plugin")
    assert _mounts(plugin)["/var/lib/composefs-csi"]["mountPropagation"] == "HostToContainer"
    # Same nodes as the node plugin, same host paths for what they share.
    assert pod_spec(dp)["priorityClassName"] == pod_spec(node)["priorityClassName"]
    assert pod_spec(dp)["tolerations"] == pod_spec(node)["tolerations"]
    assert pod_spec(dp)["nodeSelector"] == pod_spec(node)["nodeSelector"]
    for vol in ("data-dir", "run"):
        assert _volume(dp, vol)["hostPath"] == _volume(node, vol)["hostPath"]
    # Paths in the configuration lie under where the containers mount the shared directories;
    # the FUSE mountpoint itself is never a volume mount (it would be a mount in the container
    # already, and the runtime could not stat it once the FUSE mount is dead).
    cfg = driver_config(docs)
    for owner, cname in ((dp, "dataplane"), (node, "plugin")):
        mounts = _mounts(container(owner, cname))

        def under_a_mount(path: str, mounts: dict[str, Any] = mounts) -> bool:
            return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)

        assert under_a_mount(cfg["store"]["path"])
        assert under_a_mount(cfg["dataplane"]["mountpoint"])
        assert cfg["dataplane"]["mountpoint"] not in mounts
        assert str(Path(cfg["dataplane"]["socket"]).parent) in mounts


@needs_renderer
def test_controller_deployment(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["default"]
    dep = one(docs, "Deployment", "-controller")
    spec = pod_spec(dep)
    assert spec["securityContext"]["runAsNonRoot"] is True
    prov = container(dep, "csi-provisioner")
    assert "--leader-election" in prov["args"]
    assert "--extra-create-metadata" not in prov["args"]
    ctl = container(dep, "controller")
    assert "--config=/etc/composefs-csi/controller.yaml" in ctl["args"]
    assert not ctl["securityContext"].get("privileged")
    cfg = driver_config(docs, "controller.yaml")
    assert cfg["store"]["path"] in _mounts(ctl)
    assert _volume(dep, "cache")["emptyDir"] == {}
    # RBAC: provisioner rules, no secrets, no wildcard; the lease Role is namespaced.
    rules = one(docs, "ClusterRole")["rules"]
    resources = {r for rule in rules for r in rule["resources"]}
    assert "secrets" not in resources and "*" not in resources
    assert all("*" not in rule["verbs"] for rule in rules)
    pvc_verbs = next(r["verbs"] for r in rules if "persistentvolumeclaims" in r["resources"])
    assert "get" in pvc_verbs
    lease_rule = one(docs, "Role")["rules"][0]
    assert lease_rule["resources"] == ["leases"]
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == spec["serviceAccountName"]


@needs_renderer
def test_pvc_annotation_feature(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["pvc-annotation"]
    prov = container(one(docs, "Deployment", "-controller"), "csi-provisioner")
    assert "--extra-create-metadata" in prov["args"]
    scs = {d["metadata"]["name"]: d for d in by_kind(docs, "StorageClass")}
    assert scs["composefs-annotated"]["parameters"] == {"imageFromPVCAnnotation": "true"}
    tools = scs["composefs-tools"]
    assert tools["provisioner"] == DRIVER
    assert tools["parameters"] == {
        "layers": "base:1,tools:3",
        "fetch": "lazy",
        "repository": "default",
    }
    assert tools["reclaimPolicy"] == "Retain"


@needs_renderer
def test_rendered_configuration_loads_in_the_driver(rendered: dict[str, list[Doc]]) -> None:
    for name, docs in rendered.items():
        keys = ["config.yaml"] + (["controller.yaml"] if name != "no-controller" else [])
        for key in keys:
            cfg = config_from_dict(driver_config(docs, key))
            assert cfg.repositories, (name, key)
    default = config_from_dict(driver_config(rendered["default"]))
    assert default.store.size_cap == 50 << 30
    assert default.default_repository == "default"
    assert all(u.startswith("https://") for r in default.repositories.values() for u in r.urls)
    ctl = config_from_dict(driver_config(rendered["default"], "controller.yaml"))
    assert ctl.store.size_cap == 1 << 30 and ctl.store.path != default.store.path
    assert (
        config_from_dict(driver_config(rendered["store-size-decimal"])).store.size_cap
        == 200 * 10**9
    )
    assert config_from_dict(driver_config(rendered["store-size-bytes"])).store.size_cap == 10 << 30
    assert config_from_dict(driver_config(rendered["store-uncapped"])).store.size_cap is None
    custom = config_from_dict(driver_config(rendered["custom-paths"]))
    assert str(custom.store.path) == "/mnt/fast/composefs/store"


@needs_renderer
def test_repository_credentials_are_mounted_where_the_config_points(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["repositories-auth-ca"]
    raw = driver_config(docs)
    cfg = config_from_dict(raw)
    assert cfg.default_repository == "internal"
    models = cfg.repositories["models"]
    assert models.concurrency == 32 and models.timeouts.total == 300
    assert models.retries.max_attempts == 3
    assert cfg.repositories["lab"].allow_plain_http
    files: list[str] = []
    for repo in raw["repositories"]:
        auth = repo.get("auth", {})
        files += [auth[k] for k in ("token_file", "password_file") if k in auth]
        files += [repo[k] for k in ("ca_bundle", "client_cert", "client_key") if k in repo]
    assert len(files) == 6
    expected_keys = {
        "/etc/composefs-csi/repositories/models/token": ("secret", "models-token", "jwt"),
        "/etc/composefs-csi/repositories/models/ca.crt": ("configMap", "corp-ca", "bundle.pem"),
        "/etc/composefs-csi/repositories/internal/password": (
            "secret",
            "internal-auth",
            "password",
        ),
        "/etc/composefs-csi/repositories/internal/ca.crt": ("secret", "internal-ca", "ca.crt"),
        "/etc/composefs-csi/repositories/internal/tls.crt": (
            "secret",
            "internal-client-tls",
            "tls.crt",
        ),
        "/etc/composefs-csi/repositories/internal/tls.key": (
            "secret",
            "internal-client-tls",
            "tls.key",
        ),
    }
    assert set(files) == set(expected_keys)
    owners = [
        (one(docs, "DaemonSet", "-dataplane"), "dataplane"),
        (one(docs, "DaemonSet", "-node"), "plugin"),
        (one(docs, "Deployment", "-controller"), "controller"),
    ]
    for owner, cname in owners:
        mounts = _mounts(container(owner, cname))
        for f in files:
            m = mounts[str(Path(f).parent)]
            vol = _volume(owner, m["name"])
            found = [
                (kind, src[kind]["name"], item["key"])
                for src in vol["projected"]["sources"]
                for kind in src
                for item in src[kind]["items"]
                if item["path"] == Path(f).name
            ]
            assert found == [expected_keys[f]], (cname, f, found)


@needs_renderer
def test_monitoring_objects_follow_the_switch_and_the_operator_api(
    rendered: dict[str, list[Doc]],
) -> None:
    def operator_kinds(docs: list[Doc]) -> set[str]:
        return {d["kind"] for d in docs if d["apiVersion"] == OPERATOR_API}

    assert operator_kinds(rendered["monitoring-with-operator"]) == {
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    }
    assert operator_kinds(rendered["monitoring-without-operator"]) == set()
    assert operator_kinds(rendered["default-with-operator-api"]) == set()
    # Without the Services there is nothing for a ServiceMonitor to select.
    assert operator_kinds(rendered["monitoring-off"]) == set()
    assert not [
        d
        for d in by_kind(rendered["monitoring-off"], "Service")
        if "metrics" in d["metadata"]["name"]
    ]
    dash = [
        d
        for d in rendered["monitoring-without-operator"]
        if d["metadata"]["name"].endswith("-dashboard")
    ]
    assert len(dash) == 1 and dash[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash[0]["data"]["composefs-csi.json"]) == json.loads(DASHBOARD.read_text())


def _labels_match(selector: Doc, labels: dict[str, str]) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _check_duration(value: object) -> None:
    assert isinstance(value, str) and re.fullmatch(r"([0-9]+(ms|s|m|h))+", value), value


@needs_renderer
def test_service_and_pod_monitors_select_the_metrics_ports(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["monitoring-with-operator"]
    workloads = [d for d in docs if d["kind"] in ("DaemonSet", "Deployment")]
    services = [d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-metrics")]

    sm = one(docs, "ServiceMonitor")
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert sm["spec"]["namespaceSelector"]["matchNames"] == ["storage"]
    selected = [
        s for s in services if _labels_match(sm["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert len(selected) == 3
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout"}
        _check_duration(ep["interval"])
        _check_duration(ep["scrapeTimeout"])
        for svc in selected:
            assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    # Each Service selects exactly one workload's pods, on a port those pods name.
    for svc in services:
        targets = [
            w
            for w in workloads
            if _labels_match(
                {"matchLabels": svc["spec"]["selector"]},
                w["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert len(targets) == 1, svc["metadata"]["name"]
        named = {
            p["name"]: p["containerPort"]
            for c in pod_spec(targets[0])["containers"]
            for p in c.get("ports", [])
        }
        for p in svc["spec"]["ports"]:
            assert named[p["targetPort"]] == p["port"]

    pm = one(docs, "PodMonitor")
    assert set(pm["spec"]) <= {"selector", "namespaceSelector", "podMetricsEndpoints"}
    picked = [
        w
        for w in workloads
        if _labels_match(pm["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
    ]
    assert len(picked) == 3
    for ep in pm["spec"]["podMetricsEndpoints"]:
        _check_duration(ep["interval"])
        for w in picked:
            assert ep["port"] in {
                p["name"] for c in pod_spec(w)["containers"] for p in c.get("ports", [])
            }


# -- metric names ------------------------------------------------------------------------------


@functools.cache
def exported_metric_names() -> frozenset[str]:
    """Every series name the code's registry can expose (counters as *_total, histograms as
    *_bucket/_sum/_count), read from csi.metrics.REGISTRY after importing every metrics module."""
    import importlib

    from csi.metrics import REGISTRY

    for module in (
        "csi.store.metrics",
        "csi.fetch.metrics",
        "csi.fuse.metrics",
        "csi.server.metrics",
    ):
        importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return frozenset(names)


_METRIC = re.compile(r"\bcomposefs_csi_[a-z0-9_]+")


def _exprs_of(panels: list[Doc]) -> Iterator[str]:
    for p in panels:
        yield from (t["expr"] for t in p.get("targets", []))
        yield from _exprs_of(p.get("panels", []))


def _balanced(expr: str) -> bool:
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    in_str = False
    for ch in expr:
        if ch == '"':
            in_str = not in_str
        elif in_str:
            continue
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack and not in_str


def test_registry_has_the_metrics_the_dashboard_relies_on() -> None:
    names = exported_metric_names()
    assert "composefs_csi_store_bytes" in names
    assert "composefs_csi_fetch_bytes_total" in names
    assert "composefs_csi_fetch_duration_seconds_bucket" in names


def test_dashboard_is_valid_and_uses_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "composefs-csi" and dash["title"]
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = list(_exprs_of(panels))
    assert exprs
    used: set[str] = set()
    for e in exprs:
        assert _balanced(e), e
        found = set(_METRIC.findall(e))
        assert found, f"query uses no composefs metric: {e}"
        used |= found
    unknown = used - exported_metric_names()
    assert not unknown, f"dashboard queries metrics the code does not export: {sorted(unknown)}"
    # What an SRE needs to see (issue: publish latency, fetch bytes and dedup hits, store usage
    # and GC, FUSE ops and errors, gRPC errors).
    for needed in (
        "composefs_csi_publish_duration_seconds_bucket",
        "composefs_csi_fetch_bytes_total",
        "composefs_csi_fetch_dedup_hits_total",
        "composefs_csi_store_bytes",
        "composefs_csi_store_gc_runs_total",
        "composefs_csi_store_gc_freed_bytes_total",
        "composefs_csi_fuse_operations_total",
        "composefs_csi_fuse_errors_total",
        "composefs_csi_grpc_requests_total",
    ):
        assert needed in used, needed
    # Panels sit on the grid without overlapping.
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))


@needs_renderer
def test_prometheus_rules_are_well_formed(rendered: dict[str, list[Doc]]) -> None:
    rule_doc = one(rendered["monitoring-with-operator"], "PrometheusRule")
    assert set(rule_doc["spec"]) == {"groups"}
    alerts: dict[str, Doc] = {}
    for group in rule_doc["spec"]["groups"]:
        assert set(group) <= {"name", "rules", "interval"} and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            if "for" in rule:
                _check_duration(rule["for"])
            expr = rule["expr"]
            assert _balanced(expr), expr
            assert 'namespace="storage"' in expr
            assert set(_METRIC.findall(expr)) <= exported_metric_names(), expr
            alerts[rule["alert"]] = rule
    assert {
        "ComposefsCSIStoreNearlyFull",
        "ComposefsCSIStoreFull",
        "ComposefsCSIFetchFailing",
        "ComposefsCSIDataPlaneDown",
        "ComposefsCSIVolumesRepaired",
        "ComposefsCSIMissingObjects",
    } <= set(alerts)
    # The nearly-full threshold is the configured fraction of the configured cap, in bytes.
    for case, cap in (("monitoring-with-operator", "50Gi"), ("store-size-decimal", "200G")):
        doc = one(rendered[case], "PrometheusRule")
        rule = next(
            r
            for g in doc["spec"]["groups"]
            for r in g["rules"]
            if r.get("alert") == "ComposefsCSIStoreNearlyFull"
        )
        threshold = re.search(r">\s*([0-9.]+)\s*\*\s*([0-9]+)", rule["expr"])
        assert threshold is not None
        assert float(threshold.group(1)) == 0.95
        assert int(threshold.group(2)) == parse_size(cap, "cap")
    uncapped = one(rendered["store-uncapped"], "PrometheusRule")
    assert "ComposefsCSIStoreNearlyFull" not in json.dumps(uncapped)


# -- invalid values ----------------------------------------------------------------------------

INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "repository without url": ({"repositories": [{"name": "models"}]}, "urls is required"),
    "repository with empty urls": (
        {"repositories": [{"name": "models", "urls": []}]},
        "repositories.0.urls: Array must have at least 1 items",
    ),
    "no repository": ({"repositories": []}, "repositories: Array must have at least 1 items"),
    "plain http": (
        {"repositories": [{"name": "m", "urls": ["http://repo.example/"]}]},
        "plain http URL",
    ),
    "credentials in url": (
        {"repositories": [{"name": "m", "urls": ["https://user:pw@repo.example/"]}]},
        "repositories.0.urls.0: Does not match pattern",
    ),
    "typo in a key": ({"repositorys": []}, "Additional property repositorys is not allowed"),
    "wrong type": ({"verbosity": "debug"}, "verbosity: Invalid type. Expected: integer"),
    "bad store size": ({"store": {"sizeCap": "lots"}}, "store.sizeCap"),
    "bad watermark": ({"store": {"highWatermark": 2}}, "store.highWatermark"),
    "inverted watermarks": (
        {"store": {"highWatermark": 0.5, "lowWatermark": 0.7}},
        "store.lowWatermark must be below store.highWatermark",
    ),
    "unknown default repository": (
        {"defaultRepository": "nope"},
        'defaultRepository: "nope" is not the name of a configured repository',
    ),
    "duplicate repository": (
        {
            "repositories": [
                {"name": "a", "urls": ["https://x.example/"]},
                {"name": "a", "urls": ["https://y.example/"]},
            ]
        },
        'duplicate repository name "a"',
    ),
    "basic auth without user": (
        {
            "repositories": [
                {"name": "a", "urls": ["https://x/"], "auth": {"type": "basic", "secretName": "s"}}
            ]
        },
        "repositories.0.auth: username is required",
    ),
    "unknown auth type": (
        {
            "repositories": [
                {"name": "a", "urls": ["https://x/"], "auth": {"type": "oauth", "secretName": "s"}}
            ]
        },
        "repositories.0.auth.type",
    ),
    "ca from nowhere": (
        {"repositories": [{"name": "a", "urls": ["https://x/"], "caBundle": {"key": "ca.pem"}}]},
        "repositories.0.caBundle",
    ),
    "annotation class without the feature": (
        {"storageClasses": [{"name": "sc", "parameters": {"imageFromPVCAnnotation": "true"}}]},
        "imageFromPVCAnnotation needs controller.imageFromPVCAnnotation: true",
    ),
    "storage class without image": (
        {"storageClasses": [{"name": "sc", "parameters": {"fetch": "lazy"}}]},
        "parameters need image or layers",
    ),
    "storage class with unknown repository": (
        {"storageClasses": [{"name": "sc", "parameters": {"image": "a:1", "repository": "x"}}]},
        'repository "x" is not configured',
    ),
    "storage class bad fetch": (
        {"storageClasses": [{"name": "sc", "parameters": {"image": "a:1", "fetch": "sometimes"}}]},
        "storageClasses.0.parameters.fetch",
    ),
    "bad update strategy": (
        {"dataplane": {"updateStrategy": {"type": "Recreate"}}},
        "dataplane.updateStrategy.type",
    ),
}


@needs_renderer
@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_values_fail_with_a_clear_message(case: str, tmp_path: Path) -> None:
    values, message = INVALID[case]
    with pytest.raises(RenderError) as err:
        render_text(values, tmp_dir=tmp_path)
    assert message in str(err.value), str(err.value)


@needs_renderer
def test_kube_version_below_the_chart_minimum_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RenderError):
        render_text(kube_version="1.29.0", tmp_dir=tmp_path)
    assert parse_docs(render_text(kube_version="1.30.0", tmp_dir=tmp_path))


# -- manifests/ --------------------------------------------------------------------------------


@needs_renderer
def test_manifests_equal_the_default_render(tmp_path: Path) -> None:
    expected = render_text(release=MANIFEST_RELEASE, namespace=MANIFEST_NAMESPACE, tmp_dir=tmp_path)
    committed = (MANIFESTS / "composefs-csi.yaml").read_text()
    header, sep, body = committed.partition("\n---\n")
    assert sep and all(line.startswith("#") for line in header.splitlines())
    assert "---\n" + body == expected, (
        "manifests/composefs-csi.yaml differs from the chart's default render: "
        "run scripts/render-manifests.sh"
    )
    # `kubectl apply -f manifests/` applies files in name order: the namespace comes first.
    files = sorted(p.name for p in MANIFESTS.iterdir())
    assert files == ["00-namespace.yaml", "composefs-csi.yaml"]
    ns = yaml.safe_load((MANIFESTS / "00-namespace.yaml").read_text())
    assert ns["kind"] == "Namespace" and ns["metadata"]["name"] == MANIFEST_NAMESPACE
    assert {d["metadata"].get("namespace") for d in parse_docs(body)} <= {None, MANIFEST_NAMESPACE}


# -- Dockerfile --------------------------------------------------------------------------------
# No container engine here or in CI: parse the Dockerfile and check what can be checked.

DOCKERFILE = REPO / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _dockerignore_allows(rel: str) -> bool:
    """Whether .dockerignore (last matching pattern wins, '!' re-includes) keeps ``rel``."""
    import fnmatch

    keep = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pat) for p in prefixes)
        if hit:
            keep = negate
    return keep


def test_dockerfile_structure_and_copied_paths() -> None:
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    known = {"FROM", "ARG", "RUN", "COPY", "WORKDIR", "LABEL", "ENV", "USER", "HEALTHCHECK"}
    assert set(words) <= known | {"ENTRYPOINT", "CMD"}
    stages = [a.split()[-1] for w, a in ins if w == "FROM" and " AS " in a.upper()]
    assert stages == ["build", "runtime"]  # multi-stage, runtime last
    for w, a in ins:
        if w == "COPY" and "--from=" not in a:
            *sources, _dest = a.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY source {src} does not exist"
                assert _dockerignore_allows(src), f"COPY source {src} is excluded by .dockerignore"
        if w == "RUN" and "from=" in a:
            stage = re.search(r"from=([a-z0-9_-]+)", a)
            assert stage is not None and stage.group(1) in stages
    # What `pip install .` needs is in the build context, and nothing else is.
    pyproject = (REPO / "pyproject.toml").read_text()
    readme = re.search(r'readme\s*=\s*"([^"]+)"', pyproject)
    assert readme is not None and _dockerignore_allows(readme.group(1))
    assert _dockerignore_allows("csi/server/proto/csi_pb2.py")
    assert not _dockerignore_allows("tests/test_chart.py")
    assert not _dockerignore_allows(".venv/bin/python")
    assert not _dockerignore_allows("csi/__pycache__/x.pyc")
    # Runtime: non-root by default, labelled, the console script as entrypoint.
    runtime = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    user = [a for w, a in runtime if w == "USER"]
    assert user and not user[-1].startswith(("0", "root"))
    assert any(w == "LABEL" and "org.opencontainers.image.title" in a for w, a in runtime)
    entry = json.loads(next(a for w, a in runtime if w == "ENTRYPOINT"))
    assert entry == ["composefs-csi"] and 'composefs-csi = "csi.cli.main:main"' in pyproject


def _healthcheck_command() -> list[str]:
    args = next(a for w, a in dockerfile_instructions() if w == "HEALTHCHECK")
    cmd: list[str] = json.loads(args[args.index("CMD ") + 4 :])
    return cmd


def test_dockerfile_healthcheck_is_composefs_csi_probe(tmp_path: Path) -> None:
    """The HEALTHCHECK command succeeds against a ready plugin and fails against a plugin whose
    Probe reports a problem, and when nothing listens."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from csi.server.identity import IdentityService
    from csi.server.proto import csi_pb2_grpc as rpc

    cmd = _healthcheck_command()
    assert cmd == ["composefs-csi", "probe"]  # reads $CSI_ENDPOINT
    endpoint = f"unix://{tmp_path}/csi.sock"

    def run() -> int:
        env = {**os.environ, "CSI_ENDPOINT": endpoint}
        proc = subprocess.run(
            [sys.executable, "-m", "csi.cli.main", *cmd[1:]],
            env=env,
            capture_output=True,
            timeout=60,
        )
        return proc.returncode

    for problem, ok in ((None, True), ("the data plane does not answer", False)):
        server = grpc.server(ThreadPoolExecutor(2))
        checks = [lambda p=problem: p]
        rpc.add_IdentityServicer_to_server(IdentityService(controller=False, checks=checks), server)
        server.add_insecure_port(endpoint)
        server.start()
        try:
            assert (run() == 0) is ok
        finally:
            server.stop(None).wait()
    assert run() != 0


# -- examples/ ---------------------------------------------------------------------------------

EXAMPLES = REPO / "examples"


def _example_objects() -> list[tuple[str, Doc]]:
    return [
        (p.name, d)
        for p in sorted(EXAMPLES.glob("*.yaml"))
        if not p.name.startswith("values-")
        for d in parse_docs(p.read_text())
    ]


def test_examples_are_valid_kubernetes_objects() -> None:
    objects = _example_objects()
    assert {name for name, _ in objects} >= {
        "inline-pod.yaml",
        "pvc-storageclass.yaml",
        "composition.yaml",
        "lazy-volume.yaml",
    }
    problems = _validate_all(d for _, d in objects)
    assert not problems, "\n".join(problems)


def test_examples_use_volume_attributes_the_driver_accepts() -> None:
    from csi.server import attributes as a

    inline = parameters = annotated = 0
    modes: set[str] = set()
    for name, doc in _example_objects():
        if doc["kind"] in ("Pod", "Deployment"):
            spec = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
            for vol in spec.get("volumes", []):
                if vol.get("csi", {}).get("driver") == DRIVER:
                    assert vol["csi"]["readOnly"] is True, name
                    spec_ = a.parse_volume_attributes(vol["csi"]["volumeAttributes"])
                    modes.add("layers" if len(spec_.refs) > 1 else spec_.fetch_mode)
                    inline += 1
        elif doc["kind"] == "StorageClass":
            assert doc["provisioner"] == DRIVER
            params = dict(doc["parameters"])
            if params.get("imageFromPVCAnnotation") == "true":
                params |= {a.PVC_NAME: "p", a.PVC_NAMESPACE: "ns"}
            a.parse_parameters(params)
            parameters += 1
        elif doc["kind"] == "PersistentVolumeClaim":
            assert doc["spec"]["accessModes"] == ["ReadOnlyMany"], name
            ref = doc["metadata"].get("annotations", {}).get("composefs.io/image")
            if ref:
                a.parse_refs({a.IMAGE: ref}, "annotation")
                annotated += 1
    assert inline >= 3 and parameters >= 2 and annotated >= 1
    assert modes >= {"eager", "lazy", "layers"}


@needs_renderer
def test_example_helm_values_render(tmp_path: Path) -> None:
    for path in sorted(EXAMPLES.glob("values-*.yaml")):
        values = yaml.safe_load(path.read_text())
        docs = parse_docs(render_text(values, api_versions=(OPERATOR_API,), tmp_dir=tmp_path))
        cfg = config_from_dict(driver_config(docs))
        assert set(cfg.repositories) == {r["name"] for r in values["repositories"]}
        assert not _validate_all(d for d in docs if d["apiVersion"] != OPERATOR_API), path.name


@needs_renderer
def test_dataplane_command_accepts_the_rendered_configuration(
    rendered: dict[str, list[Doc]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`composefs-csi dataplane --config` turns the chart's config into the daemon's settings
    (the daemon itself is replaced: it would mount FUSE)."""
    import argparse

    import csi.fuse.daemon
    from csi.cli import runtime

    started: list[Any] = []
    monkeypatch.setattr(csi.fuse.daemon, "run_daemon", started.append)
    for case in ("default", "repositories-auth-ca", "custom-paths"):
        path = tmp_path / f"{case}.yaml"
        path.write_text(one(rendered[case], "ConfigMap", "-config")["data"]["config.yaml"])
        assert runtime.dataplane(argparse.Namespace(config=str(path))) == 0
    default, with_auth, custom = started
    assert str(default.mountpoint) == "/var/lib/composefs-csi/mnt"
    assert str(default.control_socket) == "/run/composefs-csi/dataplane.sock"
    assert str(default.store) == "/var/lib/composefs-csi/store"
    assert default.metrics_address == "0.0.0.0:9810"
    assert with_auth.default_repository == "internal"
    assert str(custom.mountpoint) == "/mnt/fast/composefs/mnt"


@needs_renderer
def test_notes_render(tmp_path: Path) -> None:
    """NOTES.txt is executed by Helm at install time (chart-render skips it): render it through
    a copy of the chart in which it is wrapped into a ConfigMap."""
    chart = tmp_path / "chart" / "composefs-csi"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text(
        '{{- define "test.notes" -}}\n' + notes + "\n{{- end -}}\n"
    )
    (chart / "templates" / "notes-check.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ include "test.notes" . | toJson }}\n'
    )
    assert RENDERER is not None

    def notes_for(values: dict[str, Any] | None) -> str:
        args = [str(RENDERER), "--name", "cfs", "--namespace", "storage"]
        if values is not None:
            vf = tmp_path / "values.yaml"
            vf.write_text(yaml.safe_dump(values))
            args += ["-f", str(vf)]
        out = subprocess.run(
            [*args, "--show-only", "templates/notes-check.yaml", str(chart)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        text: str = parse_docs(out)[0]["data"]["notes"]
        return text

    default = notes_for(None)
    assert "driver: csi.composefs.io" in default
    assert "WARNING: repository URL https://composefs.example.com/repository/" in default
    assert "default (default): https://composefs.example.com/repository/" in default
    assert "OnDelete" in default
    custom = notes_for({**REPOS_WITH_AUTH, **MONITORING_ON})
    assert "WARNING" not in custom
    assert "internal (default)" in custom and "models: https://cdn.example.net/models/" in custom
    assert "does not serve\nmonitoring.coreos.com/v1" in custom
