"""One run of the harness: its directory, the stand-in node, the repository, the chart as
rendered, the driver's pods and the app pods; set up, operated by the scenarios, torn down.

State lives in ``/var/tmp/composefs-csi-e2e`` (``$E2E_STATE_DIR``): the podman configuration,
one directory per run (``run-<id>``, removed at the end; its ``logs/`` is kept as
``logs-<id>``, the last three runs), and a lock per run held while it runs, so a later run can
clean up after one that was killed (its containers, mounts and directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import sqlite3
import string
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import repo as repolib
from .chart import Rendered, render
from .kubelet import AppPod, FakeKubelet, PersistentVolume
from .node import FakeNode, PodRuntime, RunningPod, remove_tree
from .podman import LABEL, Podman
from .podspec import Doc, Pod, host_path_in
from .provisioner import FakeProvisioner

STATE_DIR = Path(os.environ.get("E2E_STATE_DIR", "/var/tmp/composefs-csi-e2e"))
READER = Path(__file__).with_name("reader.py")
NODE_NAME = "e2e-node-1"
STORAGE_CLASS = "composefs-e2e"


def log(msg: str) -> None:
    print(msg, flush=True)


def _suffix(n: int = 5) -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(n))


def cleanup_stale(podman: Podman) -> None:
    """Remove what runs that are no longer running left behind (a killed harness)."""
    if not STATE_DIR.exists():
        return
    for run_dir in sorted(STATE_DIR.glob("run-*")):
        lock = run_dir / "lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # that run is alive
        run_id = run_dir.name.removeprefix("run-")
        log(f"cleaning up after an interrupted run {run_id}")
        for name in podman.containers(run_id):
            podman.run("rm", "-f", "-t", "0", name, check=False)
        if (run_dir / "node").exists():
            FakeNode.existing(run_dir / "node").close()
        shutil.rmtree(f"/run/cfs-e2e-{run_id}", ignore_errors=True)
        try:
            remove_tree(run_dir)
        except RuntimeError as e:
            log(f"warning: {e}")
        if fd >= 0:
            os.close(fd)


@dataclass
class Images:
    base: str
    current: str
    upgrade: str
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Reader:
    """An app pod running tests/e2e/reader.py over one volume."""

    app: AppPod
    manifest: dict[str, Any]
    results: Path
    propagation: str

    def passes(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            text = self.results.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


class Harness:
    def __init__(self, podman: Podman, images: Images, chart: Path | None = None) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.podman = podman
        self.images = images
        self.chart = chart
        self.run_id = time.strftime("%H%M%S") + _suffix(4)
        self.dir = STATE_DIR / f"run-{self.run_id}"
        self.dir.mkdir(mode=0o755)
        self._lock = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.links = Path(f"/run/cfs-e2e-{self.run_id}")
        self.logs = self.dir / "logs"
        self.logs.mkdir()
        self.trees = self.dir / "trees"
        self.repo = self.dir / "repo"
        self.node: FakeNode | None = None
        self.runtime: PodRuntime | None = None
        self.kubelet: FakeKubelet | None = None
        self.provisioner: FakeProvisioner | None = None
        self.rendered: Rendered | None = None
        self.url = ""
        self.manifests: dict[str, dict[str, Any]] = {}
        self.digests: dict[str, str] = {}
        self.driver: dict[str, RunningPod] = {}
        self.readers: dict[str, Reader] = {}
        self.volumes: list[PersistentVolume] = []
        self.figures: dict[str, str] = {}
        #: name -> (measured seconds, bar met)
        self.bars: dict[str, tuple[float, bool]] = {}
        self.current_event = ""
        #: event -> dead mounts left under live ones after the recovery
        self.covered: dict[str, int] = {}
        self._serve: contextlib.ExitStack = contextlib.ExitStack()

    # -- set-up -----------------------------------------------------------------------------

    def make_repository(self) -> None:
        """Trees, built into a repository with ``composefs-csi build``, served by nginx."""
        w = repolib.write_tree
        w(self.trees / "app1", 1, 24, big=3 << 20)
        w(self.trees / "base1", 2, 16)
        w(self.trees / "patch1", 3, 6, prefix="d1")
        # The patch overrides d0/f000.bin, hides d2 (a directory) and d3/f003.bin (a file).
        (self.trees / "patch1" / "d0").mkdir(exist_ok=True)
        (self.trees / "patch1" / "d0" / "f000.bin").write_bytes(b"patched\n" * 1000)
        (self.trees / "patch1" / ".wh.d2").write_bytes(b"")
        (self.trees / "patch1" / "d3").mkdir(exist_ok=True)
        (self.trees / "patch1" / "d3" / ".wh.f003.bin").write_bytes(b"")
        w(self.trees / "lazy1", 4, 20, big=2 << 20)
        w(self.trees / "data1", 5, 12, big=1 << 20)
        refs = {
            "app1": "app:1",
            "base1": "base:1",
            "patch1": "patch:1",
            "lazy1": "lazy:1",
            "data1": "data:1",
        }
        for tree, ref in refs.items():
            self.digests[ref] = repolib.build(self.trees / tree, self.repo, ref)
            self.manifests[ref] = repolib.manifest_of(self.trees / tree)
        self.manifests["base:1,patch:1"] = repolib.compose(
            self.manifests["base:1"], self.manifests["patch:1"]
        )
        gateway, subnet = repolib.pod_network(self.podman)
        self.url = self._serve.enter_context(repolib.serve(self.repo, self.dir, gateway, subnet))

    def values(self, image: str) -> dict[str, Any]:
        """The chart values of this run: only what a user of the chart would set."""
        repository, _, tag = image.rpartition(":")
        return {
            "image": {"repository": repository, "tag": tag},
            "repositories": [{"name": "e2e", "urls": [self.url], "allowPlainHttp": True}],
            "store": {"sizeCap": "2Gi"},
            "storageClasses": [
                {
                    "name": STORAGE_CLASS,
                    "parameters": {"image": "data:1", "repository": "e2e", "fetch": "eager"},
                }
            ],
        }

    def render(self, image: str) -> Rendered:
        kw = {"chart": self.chart} if self.chart else {}
        self.rendered = render(self.values(image), self.dir, **kw)
        return self.rendered

    def make_node(self) -> None:
        assert self.rendered is not None
        kubelet_dir = self.node_config()["node"]["kubelet_dir"]
        self.node = FakeNode(self.dir, NODE_NAME, kubelet_dir)
        self.runtime = PodRuntime(self.node, self.podman, self.run_id, self.logs)

    def node_config(self) -> dict[str, Any]:
        """The node pods' configuration file as the chart renders it (its ConfigMap)."""
        assert self.rendered is not None
        ds = self.rendered.workload("node")
        cm = next(
            v["configMap"]["name"]
            for v in ds["spec"]["template"]["spec"]["volumes"]
            if "configMap" in v
        )
        cfg: dict[str, Any] = yaml.safe_load(self.rendered.configmaps()[cm]["config.yaml"])
        return cfg

    # -- driver pods ------------------------------------------------------------------------

    def driver_pod(self, component: str) -> RunningPod:
        """Create the pod of a DaemonSet or Deployment of the chart, as its controller would."""
        assert self.rendered is not None and self.runtime is not None
        owner = self.rendered.workload(component)
        tpl = owner["spec"]["template"]
        name = owner["metadata"]["name"]
        name += f"-{_suffix()}" if owner["kind"] == "DaemonSet" else f"-{_suffix(9)}-{_suffix()}"
        pod = Pod(
            name,
            self.rendered.namespace,
            str(uuid.uuid4()),
            tpl["spec"],
            tpl["metadata"].get("labels", {}),
        )
        plan = self.runtime.plan(pod, self.rendered.configmaps())
        for cname, why in plan.skipped.items():
            self.figures[f"skipped {component}/{cname}"] = why
        running = self.runtime.start(plan)
        self.driver[component] = running
        return running

    def main_container(self, component: str) -> str:
        pod = self.driver[component]
        default = pod.pod.spec["containers"][0]["name"]
        return str(
            self.rendered.workload(component)["spec"]["template"]["metadata"]  # type: ignore[union-attr]
            .get("annotations", {})
            .get("kubectl.kubernetes.io/default-container", default)
        )

    def endpoint_on_host(self, component: str) -> Path:
        """The host path of the container's ``--endpoint=unix://...`` socket."""
        pod = self.driver[component]
        cname = self.main_container(component)
        args = pod.container_doc(cname).get("args") or []
        ep = next(a.split("=", 1)[1] for a in args if str(a).startswith("--endpoint="))
        return host_path_in(pod.plan, cname, ep.removeprefix("unix://"))

    def dataplane_mountpoint(self) -> Path:
        """The FUSE mountpoint (data plane config) as the host sees it."""
        cname = self.main_container("dataplane")
        mp = self.node_config()["dataplane"]["mountpoint"]
        return host_path_in(self.driver["dataplane"].plan, cname, mp)

    def store_on_host(self) -> Path:
        cname = self.main_container("node")
        return host_path_in(self.driver["node"].plan, cname, self.node_config()["store"]["path"])

    def short(self, socket: Path) -> Path:
        """A short name for a socket: a Unix socket address holds at most 107 bytes, and
        kubelet's directories under the run directory are longer than that."""
        self.links.mkdir(mode=0o700, exist_ok=True)
        link = self.links / f"{abs(hash(str(socket))) % 10**8}.sock"
        if not link.is_symlink():
            link.symlink_to(socket)
        return link

    def start_kubelet(self) -> FakeKubelet:
        assert self.node is not None and self.runtime is not None and self.rendered is not None
        sock = self.short(self.endpoint_on_host("node"))
        self.kubelet = FakeKubelet(self.node, self.runtime, sock, self.rendered.csi_driver())
        return self.kubelet

    # -- app pods ---------------------------------------------------------------------------

    def run_reader(
        self,
        name: str,
        volume: Doc,
        manifest_key: str,
        *,
        propagation: str = "None",
        claims: dict[str, PersistentVolume] | None = None,
        after_publish: Any = None,
    ) -> Reader:
        """An app pod (the project's image, as an unprivileged user, read-only root) whose
        container reads ``volume`` at /data with ``propagation`` and checks it."""
        assert self.kubelet is not None and self.rendered is not None
        manifest = self.manifests[manifest_key]
        cm_name = f"{name}-reader"
        configmaps = {
            cm_name: {"reader.py": READER.read_text(), "manifest.json": json.dumps(manifest)}
        }
        mount: Doc = {"name": "data", "mountPath": "/data", "readOnly": True}
        if propagation != "None":
            mount["mountPropagation"] = propagation
        spec: Doc = {
            "terminationGracePeriodSeconds": 2,
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True},
            "containers": [
                {
                    "name": "app",
                    "image": self.images.current,
                    "command": ["python", "/e2e/reader.py"],
                    "args": [
                        "--root",
                        "/data",
                        "--manifest",
                        "/e2e/manifest.json",
                        "--out",
                        "/results/passes.jsonl",
                    ],
                    "securityContext": {
                        "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [
                        mount,
                        {"name": "reader", "mountPath": "/e2e", "readOnly": True},
                        {"name": "results", "mountPath": "/results"},
                    ],
                }
            ],
            "volumes": [
                {"name": "data", **volume},
                {"name": "reader", "configMap": {"name": cm_name}},
                {"name": "results", "emptyDir": {}},
            ],
        }
        pod = Pod(name, "default", str(uuid.uuid4()), spec)
        if after_publish is not None:
            self.kubelet.after_publish = after_publish
        try:
            app = self.kubelet.run_pod(pod, configmaps, claims)
        finally:
            self.kubelet.after_publish = None
        results = app.running.plan.volumes["results"].host / "passes.jsonl"
        reader = Reader(app, manifest, results, propagation)
        self.readers[name] = reader
        return reader

    def wait_passes(
        self, reader: Reader, *, after: float, ok: bool = True, timeout: float = 60, count: int = 1
    ) -> list[dict[str, Any]]:
        """Passes that started after ``after`` (epoch), waiting until ``count`` of them (all
        successful when ``ok``) are there."""
        deadline = time.monotonic() + timeout
        while True:
            got = [p for p in reader.passes() if p["t0"] > after and (not ok or p["failed"] == 0)]
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                last = reader.passes()[-1:] or [{}]
                raise AssertionError(
                    f"pod {reader.app.pod.name}: no {'successful ' if ok else ''}pass after "
                    f"{timeout:.0f} s; last: {last[0]}; "
                    + self.runtime.tail_logs(reader.app.running, "app", 5)  # type: ignore[union-attr]
                )
            time.sleep(0.1)

    # -- node state -------------------------------------------------------------------------

    def leases(self) -> list[tuple[str, str]]:
        """(holder, image hex) rows of the store's leases table."""
        db = self.store_on_host() / "state.db"
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute("SELECT holder, hex(image) FROM leases").fetchall()
        finally:
            con.close()
        return [(str(h), str(i).lower()) for h, i in rows]

    def object_requests(self) -> int:
        """Object downloads nginx has served so far."""
        path = self.logs / "nginx-access.log"
        if not path.exists():
            return 0
        return sum(1 for line in path.read_text().splitlines() if "GET /objects/" in line)

    # -- tear-down --------------------------------------------------------------------------

    def teardown(self, keep: bool = False) -> None:
        for name in self.podman.containers(self.run_id):
            if self.runtime is not None:
                self.runtime.save_logs(name)
            self.podman.run("rm", "-f", "-t", "0", name, check=False)
        if self.kubelet is not None:
            self.kubelet.close()
        if self.node is not None:
            self.node.close()
        self._serve.close()
        shutil.rmtree(self.links, ignore_errors=True)
        kept = STATE_DIR / f"logs-{self.run_id}"
        shutil.copytree(self.logs, kept, dirs_exist_ok=True)
        for old in sorted(STATE_DIR.glob("logs-*"), key=lambda p: p.stat().st_mtime)[:-3]:
            shutil.rmtree(old, ignore_errors=True)
        if not keep:
            try:
                remove_tree(self.dir)
            except RuntimeError as e:
                log(f"warning: {e}")
        os.close(self._lock)


__all__ = ["LABEL", "Harness", "Images", "Reader", "cleanup_stale", "log"]
