"""The e2e harness's translation of pod specs into podman arguments (tests/e2e/podspec.py), on
small specs and on the chart as rendered (what `make e2e` runs). Pure: no podman needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import podspec as ps
from tests.e2e.chart import ChartError, Rendered, render, renderer

NODE = ps.NodeLayout(Path("/srv/node"), "node-a")


def _pod(spec: dict[str, Any], name: str = "p") -> ps.Pod:
    return ps.Pod(name, "ns", "uid-1", spec)


def _plan(spec: dict[str, Any], *, configmaps: Any = None, published: Any = None) -> ps.PodPlan:
    return ps.plan_pod(
        _pod(spec),
        NODE,
        configmaps or {},
        run_id="r1",
        label="lbl",
        available=lambda image: not image.startswith("registry.k8s.io/"),
        published=published,
    )


def _mounts(args: list[str]) -> dict[str, dict[str, str]]:
    out = {}
    for i, a in enumerate(args):
        if a == "--mount":
            opts = dict(o.split("=", 1) for o in args[i + 1].split(","))
            out[opts["destination"]] = opts
    return out


def _flag_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_propagation_and_hostpaths_map_under_the_node_root() -> None:
    spec = {
        "containers": [
            {
                "name": "c",
                "image": "img",
                "securityContext": {"privileged": True},
                "volumeMounts": [
                    {"name": "a", "mountPath": "/a"},
                    {"name": "b", "mountPath": "/b", "mountPropagation": "HostToContainer"},
                    {"name": "c", "mountPath": "/c", "mountPropagation": "Bidirectional"},
                    {"name": "fuse", "mountPath": "/dev/fuse"},
                ],
            }
        ],
        "volumes": [
            {"name": "a", "hostPath": {"path": "/var/a", "type": "DirectoryOrCreate"}},
            {"name": "b", "hostPath": {"path": "/var/b/", "type": "Directory"}},
            {"name": "c", "hostPath": {"path": "/var/lib/kubelet"}},
            {"name": "fuse", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}},
        ],
    }
    plan = _plan(spec)
    m = _mounts(plan.containers["c"].args)
    assert m["/a"]["source"] == "/srv/node/var/a" and m["/a"]["bind-propagation"] == "rprivate"
    assert m["/b"]["source"] == "/srv/node/var/b" and m["/b"]["bind-propagation"] == "rslave"
    assert m["/c"]["bind-propagation"] == "rshared"
    # Devices are the machine's own.
    assert m["/dev/fuse"]["source"] == "/dev/fuse"
    assert plan.volumes["b"].hostpath_type == "Directory"
    assert "--privileged" in plan.containers["c"].args


def test_bidirectional_needs_privileged() -> None:
    spec = {
        "containers": [
            {
                "name": "c",
                "image": "img",
                "volumeMounts": [
                    {"name": "a", "mountPath": "/a", "mountPropagation": "Bidirectional"}
                ],
            }
        ],
        "volumes": [{"name": "a", "hostPath": {"path": "/a"}}],
    }
    with pytest.raises(ps.UnsupportedSpec, match="privileged"):
        _plan(spec)


def test_security_context_merges_pod_and_container() -> None:
    spec = {
        "securityContext": {"runAsUser": 10, "runAsGroup": 20, "runAsNonRoot": True, "fsGroup": 30},
        "containers": [
            {
                "name": "c",
                "image": "img",
                "securityContext": {
                    "runAsUser": 11,
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
                },
            }
        ],
    }
    args = _plan(spec).containers["c"].args
    assert _flag_values(args, "--user") == ["11:20"]
    assert _flag_values(args, "--group-add") == ["30"]
    assert "--read-only" in args and "--read-only-tmpfs=false" in args
    assert _flag_values(args, "--security-opt") == ["no-new-privileges"]
    assert _flag_values(args, "--cap-drop") == ["ALL"]
    assert _flag_values(args, "--cap-add") == ["SYS_ADMIN"]
    assert "--privileged" not in args


def test_run_as_non_root_with_root_user_is_refused() -> None:
    spec = {
        "securityContext": {"runAsNonRoot": True},
        "containers": [{"name": "c", "image": "i", "securityContext": {"runAsUser": 0}}],
    }
    with pytest.raises(ps.UnsupportedSpec, match="runAsNonRoot"):
        _plan(spec)


def test_env_field_refs_and_arg_expansion() -> None:
    spec = {
        "containers": [
            {
                "name": "c",
                "image": "img",
                "command": ["run", "$(POD)"],
                "args": ["--node=$(NODE_NAME)", "--ns=$(NS)", "$(UNDEFINED)", "$$(NODE_NAME)"],
                "env": [
                    {
                        "name": "NODE_NAME",
                        "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                    },
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "POD", "value": "x-$(NODE_NAME)"},
                ],
            }
        ]
    }
    args = _plan(spec).containers["c"].args
    env = _flag_values(args, "--env")
    assert env == ["NODE_NAME=node-a", "NS=ns", "POD=x-node-a"]
    assert json.loads(_flag_values(args, "--entrypoint")[0]) == ["run", "x-node-a"]
    image_at = args.index("img")
    assert args[image_at + 1 :] == ["--node=node-a", "--ns=ns", "$(UNDEFINED)", "$(NODE_NAME)"]


def test_unknown_field_ref_is_an_error() -> None:
    spec = {
        "containers": [
            {
                "name": "c",
                "image": "i",
                "env": [{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            }
        ]
    }
    with pytest.raises(ps.UnsupportedSpec, match=r"status\.podIP"):
        _plan(spec)


def test_emptydir_configmap_csi_volumes() -> None:
    spec = {
        "containers": [
            {
                "name": "c",
                "image": "img",
                "volumeMounts": [
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "disk", "mountPath": "/cache"},
                    {"name": "cfg", "mountPath": "/etc/x/config.yaml", "subPath": "config.yaml",
                     "readOnly": True},
                    {"name": "data", "mountPath": "/data", "readOnly": True},
                ],
            }
        ],
        "volumes": [
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
            {"name": "disk", "emptyDir": {}},
            {"name": "cfg", "configMap": {"name": "cm"}},
            {"name": "data", "csi": {"driver": "d"}},
        ],
    }  # fmt: skip
    plan = _plan(
        spec,
        configmaps={"cm": {"config.yaml": "a: 1\n", "other": "x"}},
        published={"data": Path("/srv/node/var/lib/kubelet/pods/uid-1/volumes/v/mount")},
    )
    tmp, disk, cfg = plan.volumes["tmp"], plan.volumes["disk"], plan.volumes["cfg"]
    assert tmp.tmpfs and tmp.tmpfs_bytes == 16 << 20
    assert not disk.tmpfs
    assert tmp.host == Path(
        "/srv/node/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~empty-dir/tmp"
    )
    assert cfg.files == {"config.yaml": ("a: 1\n", 0o644), "other": ("x", 0o644)}
    m = _mounts(plan.containers["c"].args)
    assert m["/etc/x/config.yaml"]["source"] == str(cfg.host / "config.yaml")
    assert m["/etc/x/config.yaml"]["ro"] == "true"
    assert m["/data"]["source"].endswith("/volumes/v/mount")
    assert ps.host_path_in(plan, "c", "/tmp/a/b.sock") == tmp.host / "a" / "b.sock"
    with pytest.raises(ps.UnsupportedSpec):
        ps.host_path_in(plan, "c", "/var/elsewhere")


def test_unsupported_volume_and_fields_are_errors() -> None:
    base = {"containers": [{"name": "c", "image": "i"}]}
    with pytest.raises(ps.UnsupportedSpec, match="secret"):
        _plan({**base, "volumes": [{"name": "s", "secret": {"secretName": "x"}}]})
    with pytest.raises(ps.UnsupportedSpec, match="shareProcessNamespace"):
        _plan({**base, "shareProcessNamespace": True})
    with pytest.raises(ps.UnsupportedSpec, match="lifecycle"):
        _plan({"containers": [{"name": "c", "image": "i", "lifecycle": {}}]})


def test_quantities() -> None:
    assert ps.memory_bytes("16Mi") == 16 << 20
    assert ps.memory_bytes("1G") == 10**9
    assert ps.memory_bytes(1024) == 1024
    assert ps.cpu_millis("100m") == 100
    assert ps.cpu_millis("2") == 2000
    with pytest.raises(ps.UnsupportedSpec):
        ps.memory_bytes("100m")
    with pytest.raises(ps.UnsupportedSpec):
        ps.cpu_millis("1Gi")


# -- the chart as rendered ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    try:
        renderer()
    except ChartError as e:
        pytest.skip(str(e))
    values = {
        "repositories": [{"name": "e2e", "urls": ["http://10.0.0.1:1/"], "allowPlainHttp": True}]
    }
    return render(values, tmp_path_factory.mktemp("render"))


def _chart_plan(rendered: Rendered, component: str) -> ps.PodPlan:
    owner = rendered.workload(component)
    pod = ps.Pod(f"{component}-x", rendered.namespace, "u", owner["spec"]["template"]["spec"])
    return ps.plan_pod(
        pod,
        NODE,
        rendered.configmaps(),
        run_id="r",
        label="l",
        available=lambda image: not image.startswith("registry.k8s.io/"),
    )


@pytest.mark.parametrize("component", ["dataplane", "node", "controller"])
def test_every_chart_workload_translates(rendered: Rendered, component: str) -> None:
    """Every field the chart's pods use is understood (or deliberately ignored), the sidecars
    are the only containers skipped, and every mount and propagation of the spec is there."""
    plan = _chart_plan(rendered, component)
    spec = rendered.workload(component)["spec"]["template"]["spec"]
    for c in spec["containers"]:
        if c["image"].startswith("registry.k8s.io/"):
            assert c["name"] in plan.skipped
            continue
        args = plan.containers[c["name"]].args
        mounts = _mounts(args)
        for vm in c.get("volumeMounts") or []:
            got = mounts[vm["mountPath"]]
            assert got["bind-propagation"] == ps.PROPAGATION[vm.get("mountPropagation", "None")]
            assert (got.get("ro") == "true") == bool(vm.get("readOnly"))
        sc = c.get("securityContext") or {}
        assert ("--privileged" in args) == bool(sc.get("privileged"))
        assert ("--read-only" in args) == bool(sc.get("readOnlyRootFilesystem"))
        assert "--no-healthcheck" in args
        assert c["image"] in args


def test_node_plugin_gets_the_node_name(rendered: Rendered) -> None:
    args = _chart_plan(rendered, "node").containers["plugin"].args
    assert "--node-id=node-a" in args
    assert "NODE_NAME=node-a" in _flag_values(args, "--env")
