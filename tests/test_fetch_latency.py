"""The latency proxy (tests/support/latency.py), and the fetch through it: with a round trip
added, retries, mirrors, timeouts and verification behave as they do on loopback.

The chain is client -> LatencyProxy -> FaultProxy (tests/fetchkit.py) -> nginx."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.cli.main import main as cli
from csi.fetch import (
    Corrupt,
    RepositoryClient,
    RepositoryConfig,
    RetryPolicy,
    TimedOut,
    Timeouts,
)
from csi.image.fsverity import digest_bytes
from csi.store import Store
from tests.fetchkit import Fault, FaultProxy, World, dead_port, serve_world, store_is_verified
from tests.support.latency import LatencyProxy

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (scripts/setup.sh installs it)",
)

RTT = 0.04


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serve_world(tmp_path_factory.mktemp("fetch-latency")) as w:
        yield w


@pytest.fixture()
def faults(world: World) -> Iterator[FaultProxy]:
    with FaultProxy(world.port).running() as p:
        yield p


@pytest.fixture()
def slow(faults: FaultProxy) -> Iterator[LatencyProxy]:
    with LatencyProxy(faults.port, RTT) as p:
        yield p


def client(
    *urls: str, attempts: int = 4, read: float = 30, processes: int = 0, name: str = "latent"
) -> RepositoryClient:
    cfg = RepositoryConfig(
        name=name,
        urls=urls,
        allow_plain_http=True,
        concurrency=4,
        processes=processes,
        timeouts=Timeouts(connect=5, read=read, total=60),
        retries=RetryPolicy(max_attempts=attempts, base_backoff=0.01, max_backoff=0.05),
    )
    return RepositoryClient(cfg, sleep=lambda s: None)


def complete(store: Store, world: World, ref: str = "app:v1") -> None:
    assert store.missing_objects(world.images[ref]) == set()
    store_is_verified(store.root)


# -- the proxy itself ------------------------------------------------------------------------


def test_the_proxy_carries_bytes_intact_and_counts_them(world: World, tmp_path: Path) -> None:
    with LatencyProxy(world.port, RTT) as p:
        out = tmp_path / "big"
        subprocess.run(
            ["curl", "-sf", "-o", str(out), p.url(world.big_path.lstrip("/"))], check=True
        )
    assert out.read_bytes() == world.files["app:v1"]["big"]
    assert p.bytes_down > len(world.files["app:v1"]["big"]) and p.bytes_up > 0
    assert p.connections == 1


def test_the_proxy_forwards_to_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        LatencyProxy(80, RTT, upstream_host="192.0.2.1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.latency",
            "--upstream",
            "192.0.2.1:80",
            "--rtt-ms",
            "1",
        ],
        capture_output=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode != 0 and b"loopback" in r.stderr


def test_the_proxy_listens_on_loopback_and_ends_by_itself(world: World) -> None:
    p = LatencyProxy(world.port, RTT, max_seconds=0.5).start()
    try:
        with socket.create_connection(("127.0.0.1", p.port), timeout=5):
            pass
        assert p._proc is not None
        assert p._proc.wait(timeout=30) == 0  # its time was up: it ended on its own
    finally:
        p.stop()


def test_a_refused_upstream_is_a_closed_connection(tmp_path: Path) -> None:
    with (
        LatencyProxy(dead_port(), RTT) as p,
        client(p.url(), attempts=2) as c,
        pytest.raises(Exception, match="connection"),
    ):
        c.fetch_image("app:v1", Store(tmp_path / "s"))


# -- the fetch through it --------------------------------------------------------------------


@pytest.mark.parametrize("processes", [0, 2], ids=["threads", "workers"])
def test_retries_through_latency(
    world: World, faults: FaultProxy, slow: LatencyProxy, tmp_path: Path, processes: int
) -> None:
    for kind in ("status", "drop", "reset"):
        faults.add(Fault(kind, status=503, match="/objects/", after=10, per_path=True))
    store = Store(tmp_path / "s")
    with client(slow.url(), attempts=5, processes=processes) as c:
        if processes:
            c.bulk_min_objects = 1
        res = c.fetch_image("app:v1", store)
    assert res.objects_fetched == res.objects_total
    assert faults.requests[world.big_path] == 4  # three failures, then the object
    complete(store, world)


def test_mirrors_through_latency(world: World, tmp_path: Path) -> None:
    with (
        LatencyProxy(dead_port(), RTT) as dead,
        LatencyProxy(world.port, RTT) as good,
        client(dead.url(), good.url(), attempts=2) as c,
    ):
        store = Store(tmp_path / "s")
        c.fetch_image("nested/app:v2", store)
    complete(store, world, "nested/app:v2")


def test_timeouts_through_latency(
    world: World, faults: FaultProxy, slow: LatencyProxy, tmp_path: Path
) -> None:
    faults.add(Fault("stall", match=world.big_path, after=1000, seconds=30, times=-1))
    store = Store(tmp_path / "s")
    with client(slow.url(), attempts=2, read=0.5) as c, pytest.raises(TimedOut):
        c.fetch_image("app:v1", store)
    assert not store.has_object(digest_bytes(world.files["app:v1"]["big"]))
    store_is_verified(store.root)
    faults.clear()
    faults.add(Fault("stall", match=world.big_path, after=1000, seconds=30, times=1))
    with client(slow.url(), attempts=3, read=0.5) as c:
        c.fetch_image("app:v1", store)  # the second attempt gets through
    complete(store, world)


def test_verification_through_latency(
    world: World, faults: FaultProxy, slow: LatencyProxy, tmp_path: Path
) -> None:
    faults.add(Fault("flip", match=world.big_path, times=-1))
    store = Store(tmp_path / "s")
    with client(slow.url(), attempts=3) as c, pytest.raises(Corrupt):
        c.fetch_image("app:v1", store)
    assert not store.has_object(digest_bytes(world.files["app:v1"]["big"]))
    store_is_verified(store.root)


def test_packs_through_latency_and_faults(tmp_path: Path) -> None:
    """Ranges of a pack through the proxy and faults: one range fails, one is corrupted; the
    fetch completes, its objects verified."""
    from tests.nginx import Nginx, static_server

    src = tmp_path / "tree"
    for i in range(80):
        p = src / f"d{i % 4}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(digest_bytes(str(i).encode()) * (100 + 37 * i))
    assert cli(["build", str(src), "--repo", str(tmp_path / "repo"), "--ref", "p:1", "--pack"]) == 0
    pack = next(p.name for p in (tmp_path / "repo" / "packs").iterdir() if p.is_file())
    store = Store(tmp_path / "s")
    with (
        Nginx(tmp_path / "ng", [static_server(tmp_path / "repo")]) as ng,
        FaultProxy(ng.port).running() as faults,
        LatencyProxy(faults.port, RTT) as slow,
    ):
        faults.add(Fault("status", status=503, match=f"/packs/{pack}", times=1))
        faults.add(Fault("flip", match=f"/packs/{pack}", times=1))
        with client(slow.url(), processes=2, name="latent-packs") as c:
            c.bulk_min_objects = 1
            res = c.fetch_image("p:1", store)
        assert store.missing_objects(res.image) == set()
        # the range failed (503), then came corrupted: the entry with the flipped byte came
        # from objects/, the others from the pack
        assert faults.requests[f"/packs/{pack}"] == 2
        assert sum(u.startswith("/objects/") for u in faults.requests) == 1
    store_is_verified(store.root)
