"""The stand-in node: a host directory playing the node's ``/``, and pods run on it with podman.

The directory is bind-mounted on itself and made ``rshared``, so that mount propagation between
the containers and "the node" behaves as on a real node (a ``Bidirectional`` mount reaches the
host directory, a ``HostToContainer`` container sees what is mounted there later).

:class:`PodRuntime` is kubelet's pod lifecycle on top of :mod:`tests.e2e.podspec`: it sets up a
pod's volumes (hostPath type checks, tmpfs for ``medium: Memory``, ConfigMap files), starts its
containers, runs their readiness probes, restarts a container that exited (as kubelet does), and
deletes the pod (SIGTERM with the pod's grace period, then its volumes).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi.server.mounts import BROKEN_ERRNOS, MountInfo, parse_mountinfo

from .podman import LABEL, Podman, PodmanError
from .podspec import Doc, NodeLayout, Pod, PodPlan, VolumePlan, plan_pod


class PodStartError(RuntimeError):
    """What kubelet would report as a pod event (CreateContainerError, FailedMount...)."""


def mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        table = parse_mountinfo(f.read())
    prefix = str(path).rstrip("/") + "/"
    return [
        m.mountpoint for m in table if m.mountpoint.startswith(prefix) or m.mountpoint == str(path)
    ]


def remove_tree(path: Path) -> None:
    """``rm -rf`` that refuses to run while anything is mounted below ``path`` (it would
    delete what the mount shows)."""
    left = mounts_below(path)
    if left:
        raise RuntimeError(f"not removing {path}: still mounted there: {left[:5]}")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


class FakeNode:
    """The host directory standing in for the node's ``/``."""

    def __init__(self, run_dir: Path, name: str, kubelet_dir: str) -> None:
        self.root = run_dir / "node"
        self.root.mkdir(mode=0o755)
        _run("mount", "--bind", str(self.root), str(self.root))
        _run("mount", "--make-rshared", str(self.root))
        self.layout = NodeLayout(self.root, name, kubelet_dir)
        # What kubelet creates when it starts.
        for d in ("", "/pods", "/plugins", "/plugins_registry"):
            self.host(kubelet_dir + d).mkdir(parents=True, exist_ok=True)

    @classmethod
    def existing(cls, root: Path) -> FakeNode:
        """The stand-in node of an earlier run (to clean up after it)."""
        node = cls.__new__(cls)
        node.root = root
        node.layout = NodeLayout(root, "")
        return node

    def host(self, node_path: str) -> Path:
        return self.layout.host(node_path)

    def node_path(self, host: Path) -> str:
        return "/" + str(host.relative_to(self.root))

    def mounts(self) -> list[MountInfo]:
        """The host's mounts below the stand-in root (not the root's own bind)."""
        prefix = str(self.root) + "/"
        with open("/proc/self/mountinfo") as f:
            table = parse_mountinfo(f.read())
        return [m for m in table if m.mountpoint.startswith(prefix)]

    def dead_mounts(self) -> tuple[list[str], list[str]]:
        """(mount points that are dead where a process would look: stat fails with ENOTCONN or
        the like; dead mounts covered by a live mount on the same path, counted by path)."""
        visible: list[str] = []
        by_point: dict[str, list[MountInfo]] = {}
        for m in self.mounts():
            by_point.setdefault(m.mountpoint, []).append(m)
        covered: list[str] = []
        for point, stack in by_point.items():
            try:
                os.stat(point)
            except OSError as e:
                if e.errno in BROKEN_ERRNOS:
                    visible.append(point)
                continue
            covered += [point] * (len(stack) - 1)
        return visible, covered

    def close(self) -> None:
        """Unmount everything below the root and the root itself (lazily where busy)."""
        for m in sorted(self.mounts(), key=lambda m: -m.mount_id):
            with contextlib.suppress(RuntimeError):
                _run("umount", "-l", m.mountpoint)
        with contextlib.suppress(RuntimeError):
            _run("umount", "-l", str(self.root))


@dataclass
class RunningPod:
    plan: PodPlan
    names: dict[str, str]  # container -> podman name
    started: float = field(default_factory=time.monotonic)

    @property
    def pod(self) -> Pod:
        return self.plan.pod

    def container_doc(self, name: str) -> Doc:
        for c in self.plan.pod.spec["containers"]:
            if c["name"] == name:
                return c  # type: ignore[no-any-return]
        raise KeyError(name)


class PodRuntime:
    """kubelet's pod lifecycle (volumes, containers, probes, restarts) over podman."""

    def __init__(self, node: FakeNode, podman: Podman, run_id: str, logs: Path) -> None:
        self.node = node
        self.podman = podman
        self.run_id = run_id
        self.logs = logs
        self._images: dict[str, bool] = {}

    def available(self, image: str) -> bool:
        if image not in self._images:
            self._images[image] = self.podman.image_exists(image)
        return self._images[image]

    def plan(
        self,
        pod: Pod,
        configmaps: dict[str, dict[str, str]],
        published: dict[str, Path] | None = None,
    ) -> PodPlan:
        return plan_pod(
            pod,
            self.node.layout,
            configmaps,
            run_id=self.run_id,
            label=LABEL,
            available=self.available,
            published=published,
        )

    # -- volumes ----------------------------------------------------------------------------

    def _setup_volume(self, v: VolumePlan) -> None:
        if v.kind == "hostPath":
            _check_hostpath(v)
        elif v.kind == "emptyDir":
            v.host.mkdir(parents=True, exist_ok=True)
            if v.tmpfs:
                opts = "mode=0777" + (f",size={v.tmpfs_bytes}" if v.tmpfs_bytes else "")
                _run("mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(v.host))
            v.host.chmod(0o777)  # as kubelet makes an emptyDir
        elif v.kind == "configMap":
            v.host.mkdir(parents=True, exist_ok=True)
            for rel, (text, mode) in v.files.items():
                path = v.host / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                path.chmod(mode)

    def _teardown_volumes(self, plan: PodPlan) -> None:
        for v in plan.volumes.values():
            if v.kind == "emptyDir" and v.tmpfs:
                with contextlib.suppress(RuntimeError):
                    _run("umount", str(v.host))
        pod_dir = self.node.layout.pod_dir(plan.pod.uid)
        if pod_dir.exists():
            left = [
                m.mountpoint for m in self.node.mounts() if m.mountpoint.startswith(f"{pod_dir}/")
            ]
            if left:
                raise RuntimeError(f"pod {plan.pod.name}: mounts left in {pod_dir}: {left}")
            remove_tree(pod_dir)

    # -- pods -------------------------------------------------------------------------------

    def start(self, plan: PodPlan) -> RunningPod:
        for v in plan.volumes.values():
            self._setup_volume(v)
        names: dict[str, str] = {}
        running = RunningPod(plan, names)
        for cname, cplan in plan.containers.items():
            try:
                self.podman.run("run", "-d", *cplan.args, timeout=300)
            except PodmanError as e:
                raise PodStartError(f"pod {plan.pod.name} container {cname}: {e}") from None
            names[cname] = cplan.args[cplan.args.index("--name") + 1]
        return running

    def delete(self, pod: RunningPod, *, grace: int | None = None) -> None:
        """Delete the pod: SIGTERM, SIGKILL after the grace period, logs kept, volumes gone.
        (CSI volumes are the fake kubelet's to unpublish before this removes the directory.)"""
        g = pod.plan.grace_seconds if grace is None else grace
        for name in pod.names.values():
            self.podman.run("stop", "-t", str(g), name, check=False, timeout=g + 60)
        self.remove_containers(pod)

    def remove_containers(self, pod: RunningPod) -> None:
        for name in pod.names.values():
            self.save_logs(name)
            self.podman.run("rm", "-f", name, check=False, timeout=120)

    def finish(self, pod: RunningPod) -> None:
        self._teardown_volumes(pod.plan)

    def save_logs(self, name: str) -> None:
        proc = self.podman.run("logs", name, check=False)
        with open(self.logs / f"{name}.log", "a") as f:
            f.write(proc.stdout + proc.stderr)

    def kill(self, pod: RunningPod, container: str, signal: str = "KILL") -> None:
        self.podman.out("kill", "--signal", signal, pod.names[container])

    def wait_exited(self, pod: RunningPod, container: str, timeout: float = 60) -> int:
        code = self.podman.out("wait", pod.names[container], timeout=timeout)
        return int(code.split()[-1])

    def restart_container(self, pod: RunningPod, container: str) -> None:
        """kubelet restarting an exited container of a pod (restartPolicy Always): the same
        pod, the same volumes, a new process."""
        name = pod.names[container]
        try:
            self.podman.run("start", name, timeout=300)
        except PodmanError as e:
            raise PodStartError(f"pod {pod.pod.name}: restarting {container}: {e}") from None

    def state(self, pod: RunningPod, container: str) -> dict[str, Any]:
        st: dict[str, Any] = self.podman.inspect(pod.names[container])["State"]
        return st

    def host_pids(self, pod: RunningPod) -> set[int]:
        pids: set[int] = set()
        for name in pod.names.values():
            proc = self.podman.run("top", name, "hpid", check=False)
            pids |= {int(p) for p in proc.stdout.split()[1:] if p.isdigit()}
        return pids

    def ip(self, pod: RunningPod) -> str:
        if pod.pod.spec.get("hostNetwork"):
            return "127.0.0.1"
        first = next(iter(pod.names.values()))
        ip = self.podman.inspect(first)["NetworkSettings"]["IPAddress"]
        return str(ip)

    def exec(self, pod: RunningPod, container: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        return self.podman.run("exec", pod.names[container], *cmd, check=False, timeout=120)

    # -- probes -----------------------------------------------------------------------------

    def probe(self, pod: RunningPod, container: str, kind: str = "readinessProbe") -> bool | None:
        """Run the container's probe once, as kubelet would: True/False, or None when the
        container has no such probe."""
        spec = pod.container_doc(container).get(kind)
        if not spec:
            return None
        timeout = float(spec.get("timeoutSeconds", 1))
        if "tcpSocket" in spec:
            port = _port(pod.container_doc(container), spec["tcpSocket"]["port"])
            try:
                with socket.create_connection((self.ip(pod), port), timeout=timeout):
                    return True
            except OSError:
                return False
        if "httpGet" in spec:
            get = spec["httpGet"]
            port = _port(pod.container_doc(container), get["port"])
            url = f"http://{self.ip(pod)}:{port}{get.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return 200 <= int(r.status) < 400
            except OSError:
                return False
        if "exec" in spec:
            return self.exec(pod, container, *spec["exec"]["command"]).returncode == 0
        raise PodStartError(f"{kind} of {container}: unsupported handler {sorted(spec)}")

    def wait_ready(self, pod: RunningPod, timeout: float = 120) -> None:
        """Until every running container with a readiness probe passes it."""
        deadline = time.monotonic() + timeout
        for cname in pod.names:
            if pod.container_doc(cname).get("readinessProbe") is None:
                continue
            while not self.probe(pod, cname):
                st = self.state(pod, cname)
                if not st.get("Running"):
                    raise PodStartError(
                        f"pod {pod.pod.name}: {cname} exited ({st.get('ExitCode')}): "
                        + self.tail_logs(pod, cname)
                    )
                if time.monotonic() > deadline:
                    raise PodStartError(f"pod {pod.pod.name}: {cname} not ready in {timeout:.0f} s")
                time.sleep(0.2)

    def tail_logs(self, pod: RunningPod, container: str, lines: int = 15) -> str:
        proc = self.podman.run("logs", "--tail", str(lines), pod.names[container], check=False)
        return (proc.stdout + proc.stderr).strip()


def _port(container: Doc, port: int | str) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise PodStartError(f"container {container['name']}: no port named {port}")


_HOSTPATH_CHECKS: dict[str, Callable[[int], bool]] = {
    "Directory": stat.S_ISDIR,
    "File": stat.S_ISREG,
    "Socket": stat.S_ISSOCK,
    "CharDevice": stat.S_ISCHR,
    "BlockDevice": stat.S_ISBLK,
}


def _check_hostpath(v: VolumePlan) -> None:
    """kubelet's hostPath type handling (FailedMount when a check fails)."""
    if v.hostpath_type == "DirectoryOrCreate":
        v.host.mkdir(mode=0o755, parents=True, exist_ok=True)
    elif v.hostpath_type == "FileOrCreate":
        v.host.parent.mkdir(parents=True, exist_ok=True)
        v.host.touch(mode=0o644, exist_ok=True)
    elif v.hostpath_type in _HOSTPATH_CHECKS:
        try:
            mode = os.stat(v.host).st_mode
        except OSError as e:
            raise PodStartError(f"hostPath {v.name} ({v.host}): {e.strerror}") from None
        if not _HOSTPATH_CHECKS[v.hostpath_type](mode):
            raise PodStartError(f"hostPath {v.name} ({v.host}) is not a {v.hostpath_type}")
