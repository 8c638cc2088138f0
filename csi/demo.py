"""The quick-start demo (``make demo``): the whole driver on one machine, for real.

1. write two versions of a sample tree and publish them with ``composefs-csi build``;
2. serve that repository over HTTP on 127.0.0.1 (nginx when installed, else Python's server);
3. start the FUSE data plane and the CSI node plugin (``composefs-csi dataplane`` / ``node``)
   with a configuration naming that repository;
4. publish volumes over the plugin's Unix socket exactly as kubelet does for an inline volume
   (``NodePublishVolume`` with kubelet's volume context), show the pod's view, publish the same
   image again (warm: no download) and a composition of both versions;
5. print a few Prometheus metrics, unpublish everything and stop, leaving no mount behind.

Steps 3-5 need root (FUSE and bind mounts); without it the demo stops after step 2's checks.
Everything lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BOLD, RESET = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")


def _step(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}", flush=True)


def _cli(*args: str) -> str:
    print("$ composefs-csi " + " ".join(args), flush=True)
    r = subprocess.run(
        [sys.executable, "-m", "csi.cli.main", *args], check=True, text=True, capture_output=True
    )
    sys.stderr.write(r.stderr)
    print(r.stdout, end="", flush=True)
    return r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sample_tree(root: Path, variant: bytes) -> None:
    (root / "models").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "README").write_text("A sample tree published with composefs-csi.\n")
    (root / "models" / "weights.bin").write_bytes(bytes(range(256)) * 16384)  # 4 MiB, shared
    (root / "models" / "config.json").write_bytes(b'{"version": "%s"}\n' % variant)
    (root / "bin" / "run").write_bytes(b"#!/bin/sh\necho running model " + variant + b"\n")
    (root / "bin" / "run").chmod(0o755)
    (root / "models" / "latest").symlink_to("weights.bin")
    if variant == b"v2":
        (root / "models" / "tokenizer.bin").write_bytes(b"tok" * 50000)


@contextlib.contextmanager
def _serve(repo: Path, work: Path) -> Iterator[str]:
    """Serve ``repo`` read-only on 127.0.0.1; yields its URL."""
    port = _free_port()
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx and os.geteuid() == 0:
        conf = work / "nginx.conf"
        conf.write_text(
            f"daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;\n"
            "events {}\nhttp { access_log off; sendfile on;\n"
            f"  server {{ listen 127.0.0.1:{port}; root {repo};"
            " location / { try_files $uri =404; } } }\n"
        )
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work)])
        what = "nginx"
    else:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "-d",
                str(repo),
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        what = "python -m http.server"
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait(lambda: _http_ok(url + "meta.json"), f"{what} on {url}")
        print(f"{what} serves {repo} at {url}")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status) == 200
    except OSError:
        return False


def _wait(ready: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="composefs-csi-demo-"))
    work.chmod(0o755)  # nginx's worker (an unprivileged user) serves the repository from here
    try:
        return _demo(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _demo(work: Path) -> int:
    repo = work / "repo"
    _step("1. publish two versions of a sample tree")
    for v in (b"v1", b"v2"):
        _sample_tree(work / f"src-{v.decode()}", v)
        _cli(
            "build",
            str(work / f"src-{v.decode()}"),
            "--repo",
            str(repo),
            "--ref",
            f"sample:{v.decode()}",
        )
    _cli("inspect", "sample:v1", "--repo", str(repo))
    _cli("verify", "--repo", str(repo))

    _step("2. serve the repository over HTTP on loopback")
    with _serve(repo, work) as url:
        _cli(
            "pull",
            "sample:v1",
            "--repository",
            url,
            "--store",
            str(work / "scratch-store"),
            "--allow-plain-http",
        )
        if os.geteuid() != 0:
            print("\nsteps 3-5 need root (FUSE and bind mounts): run `make demo` as root.")
            return 0
        _driver(work, url)
    print("\ndemo finished: every step above ran for real, and nothing is left mounted.")
    return 0


def _driver(work: Path, url: str) -> None:
    import grpc

    from csi.server.proto import csi_pb2 as pb
    from csi.server.proto import csi_pb2_grpc as rpc

    _step("3. start the FUSE data plane and the CSI node plugin")
    metrics_port = _free_port()
    config = work / "config.yaml"
    config.write_text(
        f"""repositories:
  - name: demo
    urls: ["{url}"]
    allow_plain_http: true     # loopback only; production repositories use https
store:
  path: {work}/store
  size_cap: 1Gi
dataplane:
  mountpoint: {work}/mnt
  socket: {work}/dataplane.sock
  metrics_address: "127.0.0.1:{_free_port()}"
metrics:
  address: "127.0.0.1:{metrics_port}"
node:
  kubelet_dir: {work}/kubelet  # targets must lie under kubelet's directory
"""
    )
    print(config.read_text())
    endpoint = f"unix://{work}/csi.sock"
    logs = open(work / "driver.log", "wb")  # noqa: SIM115 - closed below
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for args in (
            ["dataplane", "--config", str(config)],
            ["node", "--config", str(config), "--endpoint", endpoint, "--node-id", "demo-node"],
        ):
            print("$ composefs-csi " + " ".join(args))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "csi.cli.main", *args], stdout=logs, stderr=logs
                )
            )
            if args[0] == "dataplane":
                _wait(lambda: (work / "dataplane.sock").exists(), "the data plane")
        channel = grpc.insecure_channel(endpoint)
        identity, node = rpc.IdentityStub(channel), rpc.NodeStub(channel)
        _wait(lambda: _probe(identity, pb), "the node plugin")
        info = identity.GetPluginInfo(pb.GetPluginInfoRequest())
        print(f"plugin {info.name} {info.vendor_version} is ready")

        _step("4. publish volumes the way kubelet does")
        pods = work / "kubelet" / "pods"
        cap = pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(),
            access_mode=pb.VolumeCapability.AccessMode(
                mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )
        volumes: list[tuple[str, Path]] = []

        def publish(pod: str, attrs: dict[str, str]) -> Path:
            uid = f"{pod}-0000-4000-8000-{len(volumes):012d}"
            target = pods / uid / "volumes" / "kubernetes.io~csi" / "model" / "mount"
            volume_id = f"csi-{uid}"
            context = {
                **attrs,
                "csi.storage.k8s.io/pod.name": pod,
                "csi.storage.k8s.io/pod.namespace": "default",
                "csi.storage.k8s.io/pod.uid": uid,
                "csi.storage.k8s.io/serviceAccount.name": "default",
                "csi.storage.k8s.io/ephemeral": "true",
            }
            target.parent.mkdir(parents=True)  # kubelet creates the parent; the driver the rest
            t0 = time.monotonic()
            node.NodePublishVolume(
                pb.NodePublishVolumeRequest(
                    volume_id=volume_id,
                    target_path=str(target),
                    volume_capability=cap,
                    readonly=True,
                    volume_context=context,
                ),
                timeout=120,
            )
            ms = (time.monotonic() - t0) * 1000
            print(f"NodePublishVolume {attrs} for pod {pod}: {ms:.0f} ms -> {target}")
            volumes.append((volume_id, target))
            return target

        first = publish("web-a", {"image": "sample:v1"})
        subprocess.run(["ls", "-lR", str(first)], check=True)
        print("$ cat models/config.json && bin/run")
        print((first / "models" / "config.json").read_text(), end="")
        subprocess.run(["sh", str(first / "bin" / "run")], check=True)
        subprocess.run(["findmnt", "-T", str(first), "-o", "TARGET,FSTYPE,OPTIONS"], check=False)
        try:
            (first / "new-file").write_text("x")
        except OSError as e:
            print(f"writing into the volume fails as it should: {e.strerror}")
        publish("web-b", {"image": "sample:v1"})  # warm: already local, a bind mount
        merged = publish("web-c", {"layers": "sample:v1,sample:v2", "fetch": "lazy"})
        print("composition of v1 and v2 (v2 on top):")
        subprocess.run(["ls", "-l", str(merged / "models")], check=True)

        _step("5. metrics, then unpublish and stop")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith(
                (
                    "composefs_csi_volumes_published",
                    "composefs_csi_store_bytes ",
                    "composefs_csi_store_objects ",
                    "composefs_csi_fetch_bytes_total",
                    "composefs_csi_fetch_dedup_hits_total",
                    "composefs_csi_publish_duration_seconds_count",
                )
            ):
                print(line)
        for volume_id, target in volumes:
            node.NodeUnpublishVolume(
                pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)),
                timeout=60,
            )
            print(f"NodeUnpublishVolume {volume_id}: target removed = {not target.exists()}")
        channel.close()
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()
    leftover = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(work) in line.split()[4]
    ]
    print(f"mounts left under {work}: {leftover or 'none'}")
    if leftover:
        raise RuntimeError("mounts left behind; see " + str(work / "driver.log"))


def _probe(identity: object, pb: object) -> bool:
    import grpc

    try:
        reply = identity.Probe(pb.ProbeRequest(), timeout=2)  # type: ignore[attr-defined]
    except grpc.RpcError:
        return False
    return bool(reply.ready.value)


if __name__ == "__main__":
    raise SystemExit(main())
