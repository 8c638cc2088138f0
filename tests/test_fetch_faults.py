"""Server faults injected by a proxy in front of nginx: each case recovers where it can, fails
with a clear error where it cannot, and the store only ever holds verified objects."""

from __future__ import annotations

import datetime
import email.utils
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.fetch import (
    AccessDenied,
    Corrupt,
    NotFound,
    RepositoryClient,
    RepositoryConfig,
    RetryPolicy,
    TimedOut,
    Timeouts,
    Unreachable,
)
from csi.fetch import metrics as fm
from csi.image.fsverity import digest_bytes
from csi.metrics import REGISTRY
from csi.store import Store
from tests.fetchkit import Fault, FaultProxy, World, dead_port, serve_world, store_is_verified

pytestmark = pytest.mark.skipif(
    __import__("shutil").which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (scripts/setup.sh installs it)",
)

BIG = "big"  # the 3 MiB file of app:v1


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serve_world(tmp_path_factory.mktemp("fetch-faults")) as w:
        yield w


@pytest.fixture()
def proxy(world: World) -> Iterator[FaultProxy]:
    with FaultProxy(world.port).running() as p:
        yield p


class Sleeps(list[float]):
    def __call__(self, s: float) -> None:
        self.append(s)


def client(
    *urls: str,
    attempts: int = 4,
    read: float = 30,
    total: float = 60,
    sleeps: Sleeps | None = None,
    name: str = "faulty",
) -> RepositoryClient:
    cfg = RepositoryConfig(
        name=name,
        urls=urls,
        allow_plain_http=True,
        concurrency=4,
        timeouts=Timeouts(connect=5, read=read, total=total),
        retries=RetryPolicy(max_attempts=attempts, base_backoff=0.01, max_backoff=0.05),
    )
    return RepositoryClient(cfg, sleep=sleeps if sleeps is not None else Sleeps())


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_complete(store: Store, world: World, ref: str = "app:v1") -> None:
    assert store.missing_objects(world.images[ref]) == set()
    store_is_verified(store.root)


@pytest.mark.parametrize(
    "fault",
    [
        Fault("drop", after=1 << 20),
        Fault("reset"),
        Fault("status", status=500),
        Fault("status", status=503, times=2),
        Fault("status", status=502, times=3),
    ],
    ids=["drop-mid-body", "reset", "500", "503x2", "502x3"],
)
def test_transient_faults_recover(
    world: World, proxy: FaultProxy, tmp_path: Path, fault: Fault
) -> None:
    fault.match = world.big_path
    proxy.add(fault)
    store = Store(tmp_path / "s")
    with client(f"http://127.0.0.1:{proxy.port}/") as c:
        res = c.fetch_image("app:v1", store)
    assert res.objects_fetched == res.objects_total
    assert proxy.requests[world.big_path] == fault.times + 1
    assert_complete(store, world)


def test_every_request_failing_once(world: World, proxy: FaultProxy, tmp_path: Path) -> None:
    # Each object fails four times, four different ways; the fetch still completes.
    for kind in ("status", "drop", "reset", "flip"):
        proxy.add(Fault(kind, status=503, match="/objects/", after=10, per_path=True))
    store = Store(tmp_path / "s")
    with client(f"http://127.0.0.1:{proxy.port}/", attempts=6) as c:
        c.fetch_image("app:v1", store)
    assert_complete(store, world)


def test_429_honours_retry_after(world: World, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.add(Fault("status", status=429, retry_after="2", match=world.big_path))
    proxy.add(Fault("status", status=503, retry_after="900", match=world.big_path))
    sleeps = Sleeps()
    before = metric("composefs_csi_fetch_retries_total", repository="faulty", reason="http_429")
    store = Store(tmp_path / "s")
    with client(f"http://127.0.0.1:{proxy.port}/", sleeps=sleeps) as c:
        c.fetch_image("app:v1", store)
    assert 2.0 in sleeps  # Retry-After as given
    assert 60.0 in sleeps  # capped at max_retry_after
    after = metric("composefs_csi_fetch_retries_total", repository="faulty", reason="http_429")
    assert after == before + 1
    assert_complete(store, world)


def test_retry_after_forms(world: World, proxy: FaultProxy, tmp_path: Path) -> None:
    # An HTTP date is a wait until then; a past date or an unreadable value leaves the
    # computed backoff (at most 0.05 s here).
    soon = email.utils.format_datetime(
        datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30), usegmt=True
    )
    proxy.add(Fault("status", status=503, retry_after=soon, match=world.big_path))
    proxy.add(Fault("status", status=503, retry_after="soon", match=world.big_path))
    proxy.add(
        Fault(
            "status", status=503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT", match=world.big_path
        )
    )
    sleeps = Sleeps()
    store = Store(tmp_path / "s")
    with client(f"http://127.0.0.1:{proxy.port}/", sleeps=sleeps) as c:
        c.fetch_image("app:v1", store)
    assert len(sleeps) == 3
    assert 20 <= max(sleeps) <= 30
    assert sorted(sleeps)[:2] == [s for s in sleeps if s <= 0.05]
    assert_complete(store, world)


def test_persistent_5xx_gives_up_after_max_attempts(
    world: World, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.add(Fault("status", status=500, match=world.big_path, times=-1))
    store = Store(tmp_path / "s")
    sleeps = Sleeps()
    with (
        client(f"http://127.0.0.1:{proxy.port}/", attempts=3, sleeps=sleeps) as c,
        pytest.raises(Unreachable) as ei,
    ):
        c.fetch_image("app:v1", store)
    assert proxy.requests[world.big_path] == 3
    assert len([s for s in sleeps if s <= 0.05]) >= 2
    msg = str(ei.value)
    assert "repository 'faulty'" in msg and world.big_path[9:].replace("/", "") in msg
    assert "HTTP 500" in msg and ei.value.code == "UNAVAILABLE"
    assert not store.has_object(digest_bytes(world.files["app:v1"][BIG]))
    store_is_verified(store.root)


@pytest.mark.parametrize(
    ("status", "exc"), [(404, NotFound), (410, NotFound), (403, AccessDenied), (401, AccessDenied)]
)
def test_4xx_is_not_retried(
    world: World, proxy: FaultProxy, tmp_path: Path, status: int, exc: type[Exception]
) -> None:
    proxy.add(Fault("status", status=status, match=world.big_path, times=-1))
    store = Store(tmp_path / "s")
    with client(f"http://127.0.0.1:{proxy.port}/") as c, pytest.raises(exc) as ei:
        c.fetch_image("app:v1", store)
    assert proxy.requests[world.big_path] == 1
    assert f"HTTP {status}" in str(ei.value)
    store_is_verified(store.root)


def test_flipped_bytes_are_never_stored(world: World, proxy: FaultProxy, tmp_path: Path) -> None:
    d = digest_bytes(world.files["app:v1"][BIG])
    proxy.add(Fault("flip", match=world.big_path, times=-1))
    before = metric("composefs_csi_fetch_digest_mismatches_total", repository="faulty")
    store = Store(tmp_path / "s")
    with client(f"http://127.0.0.1:{proxy.port}/", attempts=3) as c, pytest.raises(Corrupt) as ei:
        c.fetch_image("app:v1", store)
    assert "digest mismatch" in str(ei.value) and d.hex() in str(ei.value)
    assert ei.value.code == "DATA_LOSS"
    assert not store.has_object(d)
    assert metric("composefs_csi_fetch_digest_mismatches_total", repository="faulty") == before + 3
    store_is_verified(store.root)


def test_flipped_bytes_recovered_from_next_mirror(
    world: World, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.add(Fault("flip", match="/objects/", times=-1))
    store = Store(tmp_path / "s")
    with client(f"http://127.0.0.1:{proxy.port}/", world.url()) as c:
        res = c.fetch_image("app:v1", store)
    assert res.objects_fetched == res.objects_total
    assert_complete(store, world)


def test_flipped_image_bytes(world: World, proxy: FaultProxy, tmp_path: Path) -> None:
    # A ref answered with corrupted image bytes: the digest is then of the corrupt bytes, which
    # do not parse (or name another image): the fetch must not succeed with a wrong image.
    proxy.add(Fault("flip", match="/images/", times=-1))
    store = Store(tmp_path / "s")
    with client(f"http://127.0.0.1:{proxy.port}/", attempts=2) as c:
        try:
            res = c.fetch_image("app:v1", store)
        except Corrupt as e:
            assert "ref 'app:v1'" in str(e)
        except NotFound as e:
            # The flip landed in an object digest: a valid image naming an object the
            # repository does not have. It fails, naming that object.
            assert "object" in str(e)
        else:  # the flip hit a byte the image does not check: a different, valid image
            assert res.image != world.images["app:v1"]
    store_is_verified(store.root)


def test_stall_hits_read_timeout_then_recovers(
    world: World, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.add(Fault("stall", match=world.big_path, after=1 << 20, seconds=30))
    store = Store(tmp_path / "s")
    before = metric("composefs_csi_fetch_retries_total", repository="faulty", reason="timeout")
    with client(f"http://127.0.0.1:{proxy.port}/", read=1) as c:
        c.fetch_image("app:v1", store)
    assert proxy.requests[world.big_path] == 2
    assert (
        metric("composefs_csi_fetch_retries_total", repository="faulty", reason="timeout")
        == before + 1
    )
    assert_complete(store, world)


def test_whole_object_timeout(world: World, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.add(Fault("stall", match=world.big_path, after=1 << 20, seconds=30, times=-1))
    store = Store(tmp_path / "s")
    with (
        client(f"http://127.0.0.1:{proxy.port}/", attempts=2, total=1.5) as c,
        pytest.raises(TimedOut) as ei,
    ):
        c.fetch_image("app:v1", store)
    assert "timed out" in str(ei.value) and ei.value.code == "DEADLINE_EXCEEDED"
    assert proxy.requests[world.big_path] == 2
    store_is_verified(store.root)


def test_unreachable_repository(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    port = dead_port()
    with client(f"http://127.0.0.1:{port}/", attempts=2) as c, pytest.raises(Unreachable) as ei:
        c.fetch_image("app:v1", store)
    msg = str(ei.value)
    assert "repository 'faulty'" in msg and "ref 'app:v1'" in msg and "connection" in msg


def test_metrics_are_registered_without_urls(
    world: World, proxy: FaultProxy, tmp_path: Path
) -> None:
    store = Store(tmp_path / "s")
    with client(f"http://127.0.0.1:{proxy.port}/", name="metrics-repo") as c:
        c.fetch_image("app:v1", store)
        c.fetch_image("app:v1", store)
    names = {mf.name for mf in REGISTRY.collect()}
    for n in fm.NAMES:
        base = n.removesuffix("_total")
        assert base in names, n
    for mf in REGISTRY.collect():
        if not mf.name.startswith("composefs_csi_fetch_"):
            continue
        for s in mf.samples:
            for v in s.labels.values():
                assert "://" not in v and "127.0.0.1" not in v
    assert metric("composefs_csi_fetch_objects_total", repository="metrics-repo", result="ok") >= 40
    assert metric("composefs_csi_fetch_dedup_hits_total", repository="metrics-repo") >= 40
    assert (
        metric("composefs_csi_fetch_bytes_total", repository="metrics-repo", result="ok") >= 3 << 20
    )
    assert (
        metric("composefs_csi_fetch_duration_seconds_count", repository="metrics-repo", result="ok")
        == 2
    )
