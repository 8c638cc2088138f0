"""Per-node store (BRIEF §2.3): insertion, single-flight, images, leases, GC, fsck, recovery."""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from pathlib import Path

import pytest

from csi.image.fsverity import digest_bytes
from csi.metrics import REGISTRY
from csi.repo.directio import enable_direct
from csi.store import (
    DigestMismatch,
    ImageRejected,
    ObjectWriter,
    Store,
    StoreError,
    fsck_store,
    gc_store,
)
from csi.store import metrics as store_metrics

from ._storekit import (
    blob,
    fake_image,
    fake_parser,
    files_under,
    put,
    real_image,
    temp_files,
    writing,
)


def metric(name: str) -> float:
    v = REGISTRY.get_sample_value(name)
    return 0.0 if v is None else v


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store", image_parser=fake_parser)
    yield s  # type: ignore[misc]
    s.close()


def test_layout_is_a_repository(store: Store) -> None:
    for d in ("objects", "images/refs", ".tmp", "quarantine"):
        assert (store.root / d).is_dir()
    assert (store.root / "meta.json").is_file() and (store.root / "state.db").is_file()


def test_ensure_stores_once_and_counts_dedup(store: Store) -> None:
    data = blob(1, 9000)
    d = digest_bytes(data)
    hits = metric("composefs_csi_store_dedup_hits_total")
    assert store.ensure(d, writing(data)) is True
    assert store.has_object(d) and store.object_path(d).read_bytes() == data
    assert store.object_path(d).stat().st_mode & 0o777 == 0o644
    calls = []
    assert store.ensure(d, lambda w: calls.append(w)) is False
    assert calls == []
    assert metric("composefs_csi_store_dedup_hits_total") == hits + 1
    u = store.usage()
    assert (u.bytes, u.files, u.images) == (9000, 1, 0)
    assert metric("composefs_csi_store_bytes") == 9000
    assert temp_files(store.root) == []


def test_digest_mismatch_stores_nothing(store: Store) -> None:
    data = blob(2)
    d = digest_bytes(data)
    before = metric("composefs_csi_store_digest_mismatches_total")
    with pytest.raises(DigestMismatch) as ei:
        store.ensure(d, writing(data[:-1] + b"!"))
    assert ei.value.expected == d and ei.value.actual == digest_bytes(data[:-1] + b"!")
    assert metric("composefs_csi_store_digest_mismatches_total") == before + 1
    assert not store.has_object(d)
    assert files_under(store.root / "objects") == [] and temp_files(store.root) == []
    assert store.usage().files == 0
    assert store.ensure(d, writing(data)) is True


def test_fill_error_propagates_and_nothing_is_kept(store: Store) -> None:
    d = digest_bytes(b"z" * 5000)

    def bad(w: ObjectWriter) -> None:
        w.write(b"z" * 100)
        raise ConnectionError("server went away")

    with pytest.raises(ConnectionError):
        store.ensure(d, bad)
    assert not store.has_object(d) and temp_files(store.root) == []


def test_writer_reset_restarts_the_object(store: Store) -> None:
    data = blob(3, 20000)
    d = digest_bytes(data)

    def retrying(w: ObjectWriter) -> None:
        w.write(data[:7000])
        w.write(b"garbage from a broken connection")
        w.reset()
        assert w.size == 0
        w.write(data[:4096])
        w.write(memoryview(data)[4096:])

    assert store.ensure(d, retrying) is True
    assert store.object_path(d).read_bytes() == data


@pytest.mark.parametrize("size", [1, 65535, 65536, 3 * (1 << 20) + 5])
def test_direct_io_objects_are_exact(store: Store, size: int) -> None:
    """Objects announced as 64 KiB or more are written with direct I/O (padded, then
    truncated): the stored file is exactly the bytes, including after a reset mid-way."""
    data = blob(size, size)
    d = digest_bytes(data)
    used: list[bool] = []

    def fill(w: ObjectWriter) -> None:
        w.write(data[: size // 2 + 1])
        w.reset()
        w.write(data[:5000])
        w.write(data[5000:])
        used.append(w.direct)

    assert store.ensure(d, fill, size_hint=size) is True
    assert store.object_path(d).read_bytes() == data
    probe = os.open(store.root / "probe", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        supported = enable_direct(probe)
    finally:
        os.close(probe)
    assert used == [size >= 65536 and supported]


def test_writer_unusable_after_commit(store: Store) -> None:
    kept: list[ObjectWriter] = []

    def fill(w: ObjectWriter) -> None:
        kept.append(w)
        w.write(b"q" * 100)

    store.ensure(digest_bytes(b"q" * 100), fill)
    with pytest.raises(StoreError):
        kept[0].write(b"more")


def test_single_flight_50_threads(store: Store) -> None:
    contents = [blob(i, 3000 + i) for i in range(10)]
    digests = [digest_bytes(c) for c in contents]
    calls: Counter[bytes] = Counter()
    mu = threading.Lock()
    fail_once = {digests[3]}
    barrier = threading.Barrier(50)
    errors: list[BaseException] = []
    results: Counter[bool] = Counter()

    def make_fill(i: int):  # type: ignore[no-untyped-def]
        def fill(w: ObjectWriter) -> None:
            with mu:
                calls[digests[i]] += 1
                first_failure = digests[i] in fail_once
                fail_once.discard(digests[i])
            w.write(contents[i][:1000])
            if first_failure:
                raise OSError("injected failure")
            w.write(contents[i][1000:])

        return fill

    def worker(seed: int) -> None:
        order = list(range(10))
        random.Random(seed).shuffle(order)
        barrier.wait()
        for i in order:
            try:
                r = store.ensure(digests[i], make_fill(i))
                with mu:
                    results[r] += 1
            except OSError as e:
                with mu:
                    errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1  # only the caller whose fill failed sees the failure
    assert calls[digests[3]] == 2  # ... and one waiting caller retried
    assert all(calls[d] == 1 for d in digests if d != digests[3])
    assert results[True] == 10 and results[False] == 50 * 10 - 10 - 1
    assert all(
        store.object_path(d).read_bytes() == c for d, c in zip(digests, contents, strict=True)
    )
    assert temp_files(store.root) == []


def test_real_image_objects_and_missing(tmp_path: Path) -> None:
    contents = [blob(i, 200 + i) for i in range(5)]
    img, digests = real_image(contents)
    with Store(tmp_path / "s") as s:
        d = s.add_image_bytes(img)
        assert d == digest_bytes(img)
        assert os.readlink(s.image_path(d)) == f"../objects/{d.hex()[:2]}/{d.hex()[2:]}"
        assert s.image_objects(d) == digests
        assert s.missing_objects(d) == digests
        for c in contents[:3]:
            put(s, c)
        assert s.missing_objects(d) == {digest_bytes(c) for c in contents[3:]}
        assert s.add_image_bytes(img) == d  # idempotent
        assert s.usage().images == 1
        with pytest.raises(ImageRejected):
            s.add_image_bytes(b"\0" * 4096)
        assert s.usage().images == 1 and temp_files(s.root) == []


@pytest.mark.parametrize("many", [False, True], ids=["lookups", "listing"])
def test_missing_among_by_lookups_and_by_listing(
    store: Store, many: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A large set in a small store is answered from listings of objects/ (one per fan-out
    # directory) rather than a stat per object; both ways must give the same answer, for the
    # same odd entries.
    from csi.store import store as store_mod

    monkeypatch.setattr(store_mod, "LIST_MIN_OBJECTS", 1 if many else 10**9)
    stat_calls = 0
    real_has = store.repo.has_object

    def counting_has(d: bytes) -> bool:
        nonlocal stat_calls
        stat_calls += 1
        return real_has(d)

    monkeypatch.setattr(store.repo, "has_object", counting_has)
    contents = [blob(i, 100 + i) for i in range(40)]
    for c in contents[:10]:
        put(store, c)
    present = {digest_bytes(c) for c in contents[:10]}
    absent = {digest_bytes(c) for c in contents[10:]}
    odd = sorted(absent)[:3]
    # A directory with an object's name, a symlink to a file, a dangling symlink: as
    # has_object, only a regular file (or a link to one) counts.
    store.object_path(odd[0]).mkdir(parents=True)
    target = store.object_path(sorted(present)[0])
    store.object_path(odd[1]).parent.mkdir(parents=True, exist_ok=True)
    store.object_path(odd[1]).symlink_to(target)
    store.object_path(odd[2]).parent.mkdir(parents=True, exist_ok=True)
    store.object_path(odd[2]).symlink_to(store.root / "nowhere")
    (store.root / "objects" / "zz").mkdir()  # not a fan-out name: ignored
    expected = absent - {odd[1]}
    stat_calls = 0
    assert store.missing_among(present | absent) == expected
    assert store.missing_among(set()) == set()
    assert (stat_calls == 0) == many


def test_add_image_bytes_with_objects_listed_by_the_caller(tmp_path: Path) -> None:
    # A caller that validated the image (the fetcher) passes its objects: they are recorded
    # without a second walk, and a parser that would reject the image is not consulted.
    img, digests = real_image([blob("x", 300), blob("y", 400)])

    def refuse(data: bytes) -> set[bytes]:
        raise AssertionError("parsed again")

    with Store(tmp_path / "s", image_parser=refuse) as s:
        d = s.add_image_bytes(img, objects=digests)
        assert s.image_objects(d) == digests
        assert s.missing_objects(d) == digests


def test_ensure_kind_image_records_references(tmp_path: Path) -> None:
    img, digests = real_image([blob("a", 500), blob("b", 700)])
    d = digest_bytes(img)
    with Store(tmp_path / "s") as s:
        assert s.ensure(d, writing(img), kind="image") is True
        assert s.image_objects(d) == digests and s.image_path(d).read_bytes() == img
        # an object that is already present becomes an image when asked as one
        img2, d2s = real_image([blob("c", 300)])
        d2, _ = s.add_object_bytes(img2)
        with pytest.raises(StoreError):
            s.image_objects(d2)
        assert s.ensure(d2, writing(img2), kind="image") is False
        assert s.image_objects(d2) == d2s
        bad = b"\1" * 5000
        with pytest.raises(ImageRejected):
            s.ensure(digest_bytes(bad), writing(bad), kind="image")
        assert not s.has_object(digest_bytes(bad))


def make_image(store: Store, objs: list[bytes], nonce: bytes) -> bytes:
    ds = [put(store, o) for o in objs]
    return store.add_image_bytes(fake_image(ds, nonce))


def test_leases_survive_reopen_and_are_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Store(root, image_parser=fake_parser) as s:
        a = make_image(s, [blob(1), blob(2)], b"a")
        b = make_image(s, [blob(3)], b"b")
        s.lease("pod-1/vol", [a])
        s.lease("pod-1/vol", [a, b])
        s.lease("pod-2/vol", [b])
        s.release("nobody")
    with Store(root, image_parser=fake_parser) as s:
        assert s.leases() == {"pod-1/vol": {a, b}, "pod-2/vol": {b}}
        assert s.usage().lease_holders == 2 and s.usage().leased_images == 2
        s.release("pod-1/vol")
        s.release("pod-1/vol")
        assert s.leases() == {"pod-2/vol": {b}}
        assert metric("composefs_csi_store_leases") == 1


def test_gc_keeps_leased_and_collects_the_rest(store: Store) -> None:
    shared = blob("shared", 4000)
    a = make_image(store, [shared, blob("a1", 4000)], b"a")
    b = make_image(store, [shared, blob("b1", 4000)], b"b")
    orphan = put(store, blob("orphan", 4000))
    store.lease("vol", [a])
    dry = store.gc(dry_run=True)
    assert dry.removed_images == [b] and store.has_object(orphan) and store.has_image(b)
    runs = metric("composefs_csi_store_gc_runs_total")
    rep = store.gc()
    assert rep.removed_images == [b] and rep.freed_bytes == dry.freed_bytes
    assert rep.removed_objects == 3  # orphan, b1, image b
    assert metric("composefs_csi_store_gc_runs_total") == runs + 1
    assert not store.has_object(orphan) and not store.has_object(digest_bytes(blob("b1", 4000)))
    assert not store.image_path(b).exists()
    assert store.has_image(a) and store.missing_objects(a) == set()
    assert "freed" in str(rep) and b.hex() in str(rep)
    store.release("vol")
    store.gc()
    assert store.usage().files == 0 and files_under(store.root / "objects") == []


def test_gc_lru_with_target_and_refs_pruned(store: Store) -> None:
    imgs = [make_image(store, [blob(f"o{i}", 10000)], bytes([i])) for i in range(4)]
    store.repo.set_ref("old", imgs[0])
    store.set_ref("repo1", "old", imgs[0])
    store.touch(imgs[0])  # now the most recently used: imgs[1] is the oldest
    rep = store.gc(target_bytes=15000)
    assert rep.removed_images == [imgs[1], imgs[2]]
    assert store.has_image(imgs[0]) and store.has_image(imgs[3])
    rep = store.gc(target_bytes=1)
    assert rep.removed_images == [imgs[3]]
    store.gc()
    assert dict(store.repo.iter_refs()) == {} and store.get_ref("repo1", "old") is None


def test_pin_protects_until_exit(store: Store) -> None:
    a = make_image(store, [blob("p", 3000)], b"p")
    with store.pin([a]):
        assert store.gc().removed_images == []
        assert store.usage().pinned_images == 1
    assert store.gc().removed_images == [a]


def test_size_cap_watermarks(tmp_path: Path) -> None:
    with Store(tmp_path / "s", size_cap=100_000, image_parser=fake_parser) as s:
        imgs = []
        for i in range(12):
            imgs.append(make_image(s, [blob(f"w{i}", 10000)], bytes([i])))
            s.lease("vol", [imgs[-1]])
            s.release("vol")  # just touched, not leased
        used = s.usage().bytes
        assert used <= 90_000  # never stays above the high watermark after an insert
        assert s.has_image(imgs[-1])
        assert not s.has_image(imgs[0])  # oldest went first
        # below the high watermark: only unreferenced objects are collected
        s.add_object_bytes(blob("loose", 100))
        rep = s.gc()
        assert rep.removed_images == [] and rep.removed_objects == 1


def test_fsck_quarantines_flipped_byte(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Store(root, image_parser=fake_parser) as s:
        good = blob("good", 5000)
        bad = blob("bad", 5000)
        a = make_image(s, [good, bad], b"a")
        dbad = digest_bytes(bad)
        p = s.object_path(dbad)
        flipped = bytearray(bad)
        flipped[1234] ^= 0x40
        tmp = p.with_name("x")
        tmp.write_bytes(bytes(flipped))
        os.replace(tmp, p)  # a fresh inode: works even where fs-verity made the file immutable
        assert fsck_store(root, repair=False).bad != []
        assert s.has_object(dbad)
        bad_before = metric("composefs_csi_store_fsck_bad_total")
        rep = s.fsck()
        assert [path for path, _ in rep.bad] == [f"objects/{dbad.hex()[:2]}/{dbad.hex()[2:]}"]
        assert metric("composefs_csi_store_fsck_bad_total") == bad_before + 1
        assert not s.has_object(dbad) and s.missing_objects(a) == {dbad}
        q = files_under(s.quarantine_dir())
        assert len(q) == 1 and q[0].startswith(dbad.hex())
        assert (s.quarantine_dir() / q[0]).read_bytes() == bytes(flipped)
        assert s.usage().files == 2
        assert s.fsck().ok and "all good" in str(s.fsck())
        put(s, bad)  # fetched again
        assert s.missing_objects(a) == set()


def test_recovery_reconciles_files_removed_behind_its_back(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Store(root, image_parser=fake_parser) as s:
        a = make_image(s, [blob(1), blob(2)], b"a")
        b = make_image(s, [blob(3)], b"b")
        s.lease("vol-a", [a])
        gone = digest_bytes(blob(2))
        total = s.usage().bytes
    os.unlink(root / "objects" / gone.hex()[:2] / gone.hex()[2:])
    os.unlink(root / "objects" / a.hex()[:2] / a.hex()[2:])
    extra = blob("dropped in by hand", 2222)
    ed = digest_bytes(extra)
    (root / "objects" / ed.hex()[:2]).mkdir(exist_ok=True)
    (root / "objects" / ed.hex()[:2] / ed.hex()[2:]).write_bytes(extra)
    os.unlink(root / "images" / b.hex())  # link lost, object still there
    with Store(root, image_parser=fake_parser) as s:
        rec = s.recovery
        assert rec.dropped_missing == 2 and rec.images_dropped == 1
        assert rec.recorded_unknown == 1 and rec.links_fixed >= 1
        assert rec.leases_on_missing == [("vol-a", a)]
        assert "vol-a" in str(rec)
        assert s.leases() == {"vol-a": {a}}  # kept
        assert not s.has_image(a) and s.has_image(b) and s.image_path(b).exists()
        assert s.usage().bytes == total - len(blob(2)) - len(fake_image([gone, gone])) + 2222
        assert s.has_object(ed)
        # the lease still protects the image once it is fetched again
        again = make_image(s, [blob(1), blob(2)], b"a")
        assert again == a and s.gc().removed_images == [b]
        assert s.has_image(a)


def test_gc_and_fsck_functions(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Store(root, image_parser=fake_parser) as s:
        s.add_object_bytes(blob("loose", 3000))
    rep = gc_store(root, dry_run=True)
    assert rep.dry_run and rep.removed_objects == 1 and "would free" in str(rep)
    assert gc_store(root).freed_bytes == 3000
    assert fsck_store(root).ok


def test_metric_names_registered() -> None:
    names = {m.name for m in REGISTRY.collect()}
    for n in store_metrics.NAMES:
        base = n.removesuffix("_total")
        assert base in names, n


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Store(tmp_path / "s", low_watermark=0.95, high_watermark=0.9)
    with Store(tmp_path / "s2") as s:
        with pytest.raises(Exception, match="digest"):
            s.ensure(b"short", writing(b""))
        with pytest.raises(ValueError):
            s.ensure(bytes(32), writing(b""), kind="blob")  # type: ignore[arg-type]


def test_a_store_made_with_the_by_object_index_loses_it_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    # Stores made before 2026-12-07 indexed image rows by object; no query used it, and it
    # cost a third of recording an image. Opening such a store drops it, rows intact.
    import sqlite3

    contents = [blob(i, 300 + i) for i in range(3)]
    img, digests = real_image(contents)
    with Store(tmp_path / "s") as s:
        d = s.add_image_bytes(img)
    con = sqlite3.connect(tmp_path / "s" / "state.db")
    con.execute("CREATE INDEX image_objects_by_object ON image_objects(object)")
    con.commit()
    con.close()

    def indexes() -> set[str]:
        c = sqlite3.connect(tmp_path / "s" / "state.db")
        try:
            return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        finally:
            c.close()

    assert "image_objects_by_object" in indexes()
    with Store(tmp_path / "s") as s:
        assert s.image_objects(d) == digests
    assert "image_objects_by_object" not in indexes()
