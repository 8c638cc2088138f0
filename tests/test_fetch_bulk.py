"""Bulk fetches in worker processes (csi.fetch.bulk) against real nginx and the fault proxy:
the same results, errors and metrics as in-process downloads; nothing left behind."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from csi.fetch import (
    NoSpace,
    NotFound,
    RepositoryClient,
    RepositoryConfig,
    RetryPolicy,
    Unreachable,
)
from csi.fetch import objects as objects_mod
from csi.image.fsverity import digest_bytes
from csi.metrics import REGISTRY
from csi.repo.tmpfiles import WORKER_DIR_SUFFIX, WORKER_TEMP_SUFFIX
from csi.store import Store
from tests.fetchkit import Fault, FaultProxy, World, serve_world, store_is_verified

pytestmark = pytest.mark.skipif(
    __import__("shutil").which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (scripts/setup.sh installs it)",
)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serve_world(tmp_path_factory.mktemp("fetch-bulk")) as w:
        yield w


@pytest.fixture()
def proxy(world: World) -> Iterator[FaultProxy]:
    with FaultProxy(world.port).running() as p:
        yield p


def bulk_client(url: str, name: str, **kw: object) -> RepositoryClient:
    cfg = RepositoryConfig(
        name=name,
        urls=(url,),
        allow_plain_http=True,
        concurrency=4,
        processes=2,
        retries=RetryPolicy(max_attempts=3, base_backoff=0.01, max_backoff=0.05),
        **kw,  # type: ignore[arg-type]
    )
    c = RepositoryClient(cfg)
    c.bulk_min_objects = 1  # every object fetch goes through the worker processes
    return c


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def worker_temps(store: Path) -> list[Path]:
    """Worker temp files in the store's temp area (fetch workers write in directories of
    their own there)."""
    tmp = store / ".tmp"
    return [*tmp.glob(f"*{WORKER_TEMP_SUFFIX}"), *tmp.glob(f"*{WORKER_DIR_SUFFIX}/*")]


def worker_dirs(store: Path) -> list[Path]:
    return list((store / ".tmp").glob(f"*{WORKER_DIR_SUFFIX}"))


def _processes(test: Callable[[Path], bool]) -> set[int]:
    """Pids of the processes whose /proc directory passes ``test`` (gone ones skipped)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if test(d):
                    out.add(int(d.name))
            except OSError:
                continue
    return out


def _forkserver_processes() -> set[int]:
    """Processes started by multiprocessing's forkserver (the server and its workers)."""
    return _processes(lambda d: b"multiprocessing.forkserver" in (d / "cmdline").read_bytes())


def object_path(world: World, name: str, ref: str = "app:v1") -> str:
    h = digest_bytes(world.files[ref][name]).hex()
    return f"/objects/{h[:2]}/{h[2:]}"


def test_bulk_fetch_is_complete_verified_and_counted(world: World, tmp_path: Path) -> None:
    ok_bytes = metric("composefs_csi_fetch_bytes_total", repository="bulk-a", result="ok")
    ok_objects = metric("composefs_csi_fetch_objects_total", repository="bulk-a", result="ok")
    store = Store(tmp_path / "s")
    with bulk_client(f"http://127.0.0.1:{world.port}/", "bulk-a") as c:
        res = c.fetch_image("app:v1", store)
        # Each worker wrote in a directory of its own (kept while the client lives).
        assert worker_dirs(store.root) and worker_temps(store.root) == []
        again = c.fetch_image("nested/app:v2", store)  # shares 90%: only the rest is fetched
    assert worker_dirs(store.root) == []  # removed with the workers
    assert res.objects_fetched == res.objects_total > 8
    assert store.missing_objects(world.images["app:v1"]) == set()
    assert store.missing_objects(world.images["nested/app:v2"]) == set()
    assert 0 < again.objects_fetched < again.objects_total
    assert store_is_verified(store.root) == len(list(store.repo.iter_objects()))
    assert worker_temps(store.root) == []
    # what the workers downloaded is counted in this process's metrics
    fetched = res.objects_fetched + again.objects_fetched
    new_objects = metric("composefs_csi_fetch_objects_total", repository="bulk-a", result="ok")
    assert new_objects - ok_objects == fetched
    objects = store.image_objects(res.image) | store.image_objects(again.image)
    object_bytes = sum(store.object_path(d).stat().st_size for d in objects)
    new_bytes = metric("composefs_csi_fetch_bytes_total", repository="bulk-a", result="ok")
    assert object_bytes <= new_bytes - ok_bytes <= object_bytes + (1 << 20)  # + the images


def test_bulk_recovers_from_flipped_bytes(world: World, proxy: FaultProxy, tmp_path: Path) -> None:
    """A worker retries a corrupt download; the retry and the mismatch reach our metrics."""
    big = object_path(world, "big")
    proxy.add(Fault("flip", match=big))
    retries = metric("composefs_csi_fetch_retries_total", repository="bulk-b", reason="corrupt")
    mismatches = metric("composefs_csi_fetch_digest_mismatches_total", repository="bulk-b")
    store = Store(tmp_path / "s")
    with bulk_client(f"http://127.0.0.1:{proxy.port}/", "bulk-b") as c:
        res = c.fetch_image("app:v1", store)
    assert res.objects_fetched == res.objects_total
    assert proxy.requests[big] == 2
    store_is_verified(store.root)
    assert (
        metric("composefs_csi_fetch_retries_total", repository="bulk-b", reason="corrupt")
        == retries + 1
    )
    assert metric("composefs_csi_fetch_digest_mismatches_total", repository="bulk-b") == (
        mismatches + 1
    )


def test_bulk_not_found_keeps_its_class_and_subject(
    world: World, proxy: FaultProxy, tmp_path: Path
) -> None:
    big = object_path(world, "big")
    proxy.add(Fault("status", match=big, status=404, times=-1))
    store = Store(tmp_path / "s")
    with (
        bulk_client(f"http://127.0.0.1:{proxy.port}/", "bulk-c") as c,
        pytest.raises(NotFound) as e,
    ):
        c.fetch_image("app:v1", store)
    assert e.value.subject == f"object {digest_bytes(world.files['app:v1']['big']).hex()}"
    assert "bulk-c" in str(e.value) and "404" in str(e.value)
    store_is_verified(store.root)  # the other objects are stored, verified
    assert worker_temps(store.root) == []


def test_bulk_first_attempt_counts_toward_max_attempts(
    world: World, proxy: FaultProxy, tmp_path: Path
) -> None:
    # The first attempt runs in a worker's batch of requests; the retries after it are the
    # client's loop, which counts that first attempt: 3 attempts in all, 3 requests.
    big = object_path(world, "big")
    proxy.add(Fault("status", match=big, status=500, times=-1))
    retries = metric("composefs_csi_fetch_retries_total", repository="bulk-g", reason="http_5xx")
    store = Store(tmp_path / "s")
    with (
        bulk_client(f"http://127.0.0.1:{proxy.port}/", "bulk-g") as c,
        pytest.raises(Unreachable) as e,
    ):
        c.fetch_image("app:v1", store)
    assert proxy.requests[big] == 3
    assert e.value.subject == f"object {digest_bytes(world.files['app:v1']['big']).hex()}"
    after = metric("composefs_csi_fetch_retries_total", repository="bulk-g", reason="http_5xx")
    assert after == retries + 2
    assert worker_temps(store.root) == []


@pytest.mark.root
def test_bulk_worker_out_of_space_falls_back_to_the_store(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker cannot write the 3 MiB object on a full disk: the object is fetched again
    in-process, where the store collects garbage and then says clearly that it is full."""
    from tests.test_store_full import small_tmpfs

    caplog.set_level(logging.INFO, logger="csi.fetch")
    with small_tmpfs(tmp_path / "mnt", "2m") as mnt:
        store = Store(mnt / "store")
        with (
            bulk_client(f"http://127.0.0.1:{world.port}/", "bulk-d") as c,
            pytest.raises(NoSpace, match="no space left in the store"),
        ):
            c.fetch_image("app:v1", store)
        assert "fetching it in-process" in caplog.text  # a worker ran out of space first
        assert worker_temps(store.root) == []
        assert list((store.root / ".tmp").glob("*.tmp")) == []
        store_is_verified(store.root)


WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from csi.store import Store

    store = Store(Path(sys.argv[1]))
    data = Path(sys.argv[2]).read_bytes()
    digest = bytes.fromhex(sys.argv[3])
    with store.repo.tmp.key_locks.hold(digest):  # as Store.ensure holds it while it writes
        print("holding", flush=True)
        sys.stdin.readline()
        tmp = store.repo.tmp.path / "writer.tmp"
        tmp.write_bytes(data)
        store.object_path(digest).parent.mkdir(exist_ok=True)
        os.rename(tmp, store.object_path(digest))
        store.record_named([(digest, len(data), False)])
    print("written", flush=True)
    """
)


def test_an_object_another_process_writes_is_waited_for_not_fetched(
    world: World, proxy: FaultProxy, tmp_path: Path
) -> None:
    """A worker takes each object's lock across processes before it fetches it. One that
    another process holds (it is writing that object) is not fetched beside it: the fetch
    waits for that process and finds the object present."""
    root = tmp_path / "s"
    store = Store(root)
    data = world.files["app:v1"]["big"]
    digest = digest_bytes(data)
    src = tmp_path / "big"
    src.write_bytes(data)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(src), digest.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert writer.stdin is not None and writer.stdout is not None
    try:
        assert writer.stdout.readline() == b"holding\n"
        out: dict[str, Any] = {}

        def fetch() -> None:
            with bulk_client(f"http://127.0.0.1:{proxy.port}/", "bulk-held") as c:
                out["res"] = c.fetch_image("app:v1", store)

        t = threading.Thread(target=fetch)
        t.start()
        others = [digest_bytes(d) for n, d in world.files["app:v1"].items() if n != "big"]
        deadline = time.monotonic() + 60
        while store.missing_among(others) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not store.missing_among(others)  # the workers did the rest...
        assert t.is_alive() and not store.has_object(digest)  # ...and this one waits
        said, _ = writer.communicate(b"go\n", timeout=60)
        assert said == b"written\n"
        t.join(60)
        assert not t.is_alive()
    finally:
        writer.kill()
        writer.wait()
    res = out["res"]
    assert proxy.requests[object_path(world, "big")] == 0  # never downloaded here
    assert res.objects_fetched == res.objects_total - 1 and res.objects_present == 1
    assert store.missing_objects(res.image) == set()
    store_is_verified(root)


def test_a_worker_leaves_out_an_object_present_once_it_holds_its_lock(
    world: World, proxy: FaultProxy, tmp_path: Path
) -> None:
    """Run here, as a worker runs it: an object that is present by the time the worker holds
    its lock (another process named it meanwhile) comes back as not new, and is not asked for."""
    from csi.fetch import worker
    from csi.fetch.naming import Named

    store = Store(tmp_path / "s")
    have, want = world.files["app:v1"]["big"], world.files["app:v1"]["s1-0000"]
    store.add_object_bytes(have)
    worker.init(
        RepositoryConfig(
            name="w", urls=(f"http://127.0.0.1:{proxy.port}/",), allow_plain_http=True
        ),
        os.getpid(),
        logging.WARNING,
        None,
    )
    items = [(digest_bytes(have), len(have)), (digest_bytes(want), len(want))]
    results, _ = worker.fetch_chunk(
        str(store.repo.tmp.path),
        f"{store.repo.tmp.owner()}-t",
        items,
        None,
        str(store.repo.root),
        False,
        False,
        str(store.key_locks_path),
    )
    assert results[0] == Named(items[0][0], len(have), 0, False, False)
    assert isinstance(results[1], Named) and results[1].new and store.has_object(items[1][0])
    assert proxy.requests[object_path(world, "big")] == 0
    assert proxy.requests[object_path(world, "s1-0000")] == 1


KILLED_BULK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from csi.fetch import RepositoryClient, RepositoryConfig
    from csi.store import Store

    cfg = RepositoryConfig(name="k", urls=(sys.argv[2],), allow_plain_http=True,
                           concurrency=2, processes=2)
    c = RepositoryClient(cfg)
    c.bulk_min_objects = 1
    c.fetch_image("app:v1", Store(Path(sys.argv[1])))
    """
)


def test_kill9_during_bulk_fetch_leaves_nothing(
    world: World, proxy: FaultProxy, tmp_path: Path
) -> None:
    big = object_path(world, "big")
    proxy.add(Fault("stall", match=big, times=-1, after=2 << 20, seconds=30))
    root = tmp_path / "store"
    before = _forkserver_processes()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BULK, str(root), f"http://127.0.0.1:{proxy.port}/"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not worker_temps(root):
            time.sleep(0.05)
        assert worker_temps(root), "no worker started writing"
        assert _forkserver_processes() - before, "no worker processes seen"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    # Its workers (one stuck in the stalled transfer) and their server end with it.
    deadline = time.monotonic() + 20
    while _forkserver_processes() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _forkserver_processes() - before, "orphaned worker processes"
    with Store(root) as s:  # the dead fetch's worker files are removed, with their directories
        assert worker_temps(root) == []
        assert worker_dirs(root) == []
        assert s.recovery.temp_removed >= 1
    store_is_verified(root)
    store = Store(root)
    with bulk_client(f"http://127.0.0.1:{world.port}/", "bulk-e") as c:
        res = c.fetch_image("app:v1", store)
    assert store.missing_objects(res.image) == set()
    store_is_verified(root)


def test_chunks_are_claimed_only_when_a_worker_is_free(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two chunk threads per worker, but a chunk is claimed (and its worker then takes a lock
    per object) only once a worker is free to take it: never more chunks claimed and not yet
    back from a worker than there are workers (then recording what came back overlaps the
    next)."""
    store = Store(tmp_path / "s")
    staged = peak = 0
    mu = threading.Lock()
    mine_now = threading.local()
    real_claim = Store.claim_in_process

    def leave() -> None:
        nonlocal staged
        if getattr(mine_now, "staged", False):
            mine_now.staged = False
            with mu:
                staged -= 1

    @contextlib.contextmanager
    def claim(self: Store, digests: Iterable[bytes]) -> Iterator[set[bytes]]:
        nonlocal staged, peak
        with real_claim(self, digests) as mine:
            with mu:
                staged += 1
                peak = max(peak, staged)
            mine_now.staged = True
            try:
                yield mine
            finally:
                leave()

    monkeypatch.setattr(Store, "claim_in_process", claim)
    with bulk_client(f"http://127.0.0.1:{world.port}/", "bulk-slots") as c:
        assert c.objects.bulk is not None
        real_fetch = c.objects.bulk.fetch

        def slow_fetch(*a: Any, **k: Any) -> Any:
            try:
                time.sleep(0.05)  # the other chunk threads try to claim meanwhile
                return real_fetch(*a, **k)
            finally:
                leave()  # back from the worker

        monkeypatch.setattr(c.objects.bulk, "fetch", slow_fetch)
        monkeypatch.setattr(objects_mod, "_BULK_CHUNK", 2)
        monkeypatch.setattr(objects_mod, "_BULK_CHUNK_MIN", 1)
        res = c.fetch_image("app:v1", store)
    assert res.objects_fetched == res.objects_total >= 8
    assert store.missing_objects(res.image) == set()
    assert 1 <= peak <= 2  # bulk_client's 2 workers (4 chunk threads)


def test_bulk_job_skips_objects_no_fetch_wants_any_more(tmp_path: Path) -> None:
    """A chunk queued behind others may find every fetch that wanted its objects gone (they
    failed): those objects are not downloaded, and their waiters get Cancelled."""
    from csi.fetch.progress import FetchProgress
    from csi.fetch.tasks import Cancelled, Task

    store = Store(tmp_path / "s")
    digest = digest_bytes(b"never wanted")
    with bulk_client("http://127.0.0.1:9/", "bulk-f") as c:  # nothing listens there
        task, created = c.objects.tasks.register(store, digest, 100, FetchProgress())
        assert created and isinstance(task, Task)
        task.interest = 0
        c.objects.bulk_job(store, [(digest, task)])
        assert task.done()
        with pytest.raises(Cancelled, match="every fetch that wanted it failed"):
            task.result  # noqa: B018 (raises the error the task ended with)
        assert c.objects.tasks.inflight == {}
    assert not store.has_object(digest)


def _children(pids: set[int]) -> set[int]:
    """Processes whose parent is one of ``pids``."""

    def parent_in(d: Path) -> bool:
        stat = (d / "stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[1]) in pids

    return _processes(parent_in)


def test_warm_starts_the_workers_before_any_fetch_and_close_ends_them(world: World) -> None:
    from csi.fetch.bulk import BulkPool

    cfg = RepositoryConfig(
        name="bulk-w", urls=(f"http://127.0.0.1:{world.port}/",), allow_plain_http=True
    )
    pool = BulkPool(cfg, 3)
    servers = _forkserver_processes()
    before = _children(servers)
    pool.warm()
    pool.warm()  # a second call while the first is under way starts nothing more
    deadline = time.monotonic() + 60
    started: set[int] = set()
    while time.monotonic() < deadline:
        servers = _forkserver_processes()
        started = _children(servers) - before
        if started:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    started = _children(_forkserver_processes()) - before
    # Forked from the server with no fetch asking: one per task submitted while no worker was
    # idle yet (all three, unless one was already done with its task).
    assert 1 <= len(started) <= 3, started
    pool.close()
    assert not _children(_forkserver_processes()) & started
    pool.warm()  # after close: nothing starts, nothing raises
    with pytest.raises(RuntimeError, match="shut down"):
        pool.fetch(
            Path("/nonexistent"),
            "0" * 32,
            [],
            repo_root=Path("/nonexistent"),
            locks=Path("/nonexistent"),
        )
    time.sleep(0.2)
    assert not _children(_forkserver_processes()) & started


def test_fetch_of_a_large_new_image_warms_the_workers(world: World, tmp_path: Path) -> None:
    # The workers are asked to start as soon as the image is known to have enough new objects
    # (before its objects are listed), and are then used for them.
    from csi.fetch import bulk

    calls: list[str] = []
    store = Store(tmp_path / "s")
    with bulk_client(f"http://127.0.0.1:{world.port}/", "bulk-w2") as c:
        assert c.objects.bulk is not None
        real = c.objects.bulk.warm

        def warm() -> None:
            calls.append("warm")
            real()

        c.objects.bulk.warm = warm  # type: ignore[method-assign]
        fetch = c.objects.bulk.fetch

        def counted(*a: object, **kw: object) -> bulk.ChunkResult:
            calls.append("fetch")
            return fetch(*a, **kw)  # type: ignore[arg-type]

        c.objects.bulk.fetch = counted  # type: ignore[method-assign]
        c.fetch_image("app:v1", store)
    assert calls[0] == "warm" and "fetch" in calls
    assert store.missing_objects(world.images["app:v1"]) == set()


def test_a_killed_worker_is_replaced(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that dies (OOM kill, say) breaks its pool; the chunks it had are fetched
    in-process and later fetches start new workers instead of staying in-process for good."""
    caplog.set_level(logging.WARNING, logger="csi.fetch")
    with bulk_client(f"http://127.0.0.1:{world.port}/", "bulk-h") as c:
        assert c.objects.bulk is not None
        c.fetch_image("app:v1", Store(tmp_path / "s1"))
        pool = c.objects.bulk._pool
        assert pool is not None
        victim = next(iter(pool._processes))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{victim}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        store2 = Store(tmp_path / "s2")
        c.fetch_image("app:v1", store2)  # may meet the broken pool: in-process then
        assert store2.missing_objects(world.images["app:v1"]) == set()
        caplog.clear()
        store3 = Store(tmp_path / "s3")
        c.fetch_image("app:v1", store3)
        assert "worker process failed" not in caplog.text
        assert c.objects.bulk._pool is not None and c.objects.bulk._pool is not pool
        assert store3.missing_objects(world.images["app:v1"]) == set()
        assert worker_temps(store2.root) == worker_temps(store3.root) == []


def test_objects_are_reported_done_as_they_end(world: World, tmp_path: Path) -> None:
    """Objects count as done chunk by chunk, while later ones are still downloading (not all
    at the end), so progress bars and the per-fetch counters move during a bulk fetch."""
    from csi.fetch.progress import FetchProgress, ProgressSnapshot

    snaps: list[ProgressSnapshot] = []
    prog = FetchProgress(snaps.append)
    with bulk_client(f"http://127.0.0.1:{world.port}/", "bulk-p") as c:
        res = c.fetch_image("app:v1", Store(tmp_path / "s"), prog)
    final = snaps[-1]
    assert final.objects_done == res.objects_total > 8
    assert any(s.objects_done > 0 and s.bytes_downloaded < final.bytes_downloaded for s in snaps)
    done = [s.objects_done for s in snaps]
    assert done == sorted(done)  # never goes back


def test_small_objects_get_more_requests_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a round trip, one request per object is paced by the round trip: a worker runs
    more of them at once when they are small (up to 4x its share of the concurrency)."""
    from csi.fetch import worker

    monkeypatch.setattr(worker, "_parallel", 4)
    d = b"\0" * 32
    assert worker.in_flight([(d, 400_000)] * 10) == 4  # large: the configured share
    assert worker.in_flight([(d, 100_000)] * 10) == 11  # 1 MiB in flight
    assert worker.in_flight([(d, 4096)] * 10) == 16  # capped at 4x
    assert worker.in_flight([(d, None)] * 10) == 4  # sizes unknown
