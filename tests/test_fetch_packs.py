"""Pack files (issue 14): `composefs-csi build --pack` writes them, an eager fetch takes objects
out of them with a few Range requests from a real nginx (or a local directory), and nothing
from a pack is used unless it decodes to the size the image records and verifies against its
digest: whatever does not comes from objects/, and the store only ever holds verified objects.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi.cli.main import main as cli
from csi.fetch import RepositoryClient, RepositoryConfig, RetryPolicy
from csi.fetch.packs import RangeEntry, RangeSplitter, decode, plan
from csi.image.tree import INLINE_CONTENT_DEFAULT_MAX
from csi.metrics import REGISTRY
from csi.repo import Repository
from csi.repo.packs import (
    ENC_RAW,
    ENC_ZSTD,
    MAGIC,
    IndexEntry,
    PackIndex,
    PackIndexError,
    index_relpath,
    parse_index,
)
from csi.repo.refdeltas import apply_delta, delta_relpath, parse_pointer, pointer_relpath
from csi.store import Store
from tests.fetchkit import store_is_verified
from tests.nginx import Nginx, static_server

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (scripts/setup.sh installs it)",
)


def write_tree(root: Path, seed: int, n: int, *, text: bool = False) -> None:
    rnd = random.Random(seed)
    for i in range(n):
        p = root / f"d{i // 20}" / f"f{i:04d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        size = rnd.choice([100, 3000, 20_000, 70_000])
        if text:
            words = [f"word{rnd.randrange(300)}" for _ in range(size // 6 + 1)]
            p.write_bytes(" ".join(words).encode()[:size])
        else:
            p.write_bytes(rnd.randbytes(size))
    big = root / "big"
    big.write_bytes(random.Random(seed + 99).randbytes(2 << 20))  # above --pack-max-object


def build(tree: Path, repo: Path, ref: str, *flags: str) -> bytes:
    assert cli(["build", str(tree), "--repo", str(repo), "--ref", ref, *flags]) == 0
    return Repository(repo).resolve_ref(ref)


@dataclass
class Packed:
    root: Path  # served at /
    v1: bytes
    v2: bytes
    nginx: Nginx

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.nginx.port}/{path}"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Packed]:
    work = tmp_path_factory.mktemp("packs")
    write_tree(work / "t1", 1, 120)
    shutil.copytree(work / "t1", work / "t2")
    write_tree(work / "t2" / "new", 2, 30)  # v2: v1 plus 30 new files
    write_tree(work / "t3", 3, 60, text=True)
    root = work / "srv"
    v1 = build(work / "t1", root / "raw", "app:v1", "--pack")
    v2 = build(work / "t2", root / "raw", "app:v2", "--pack")
    assert build(work / "t1", root / "zstd", "app:v1", "--pack", "--compress", "3") == v1
    build(work / "t3", root / "zstd", "text:v1", "--pack", "--compress", "3")
    build(work / "t1", root / "plain", "app:v1")
    # The same repository, but its server ignores Range (answers 200 with the whole file).
    shutil.copytree(root / "raw", root / "norange", symlinks=True)
    servers = [
        static_server(root, extra=f"location /norange/ {{ alias {root}/norange/; max_ranges 0; }}")
    ]
    with Nginx(work / "nginx", servers) as ng:
        yield Packed(root, v1, v2, ng)


def client(url: str, name: str = "packs", **kw: object) -> RepositoryClient:
    cfg = RepositoryConfig(
        name=name,
        urls=(url,),
        allow_plain_http=True,
        concurrency=4,
        processes=2,
        retries=RetryPolicy(max_attempts=2, base_backoff=0.01, max_backoff=0.02),
        **kw,  # type: ignore[arg-type]
    )
    c = RepositoryClient(cfg)
    c.bulk_min_objects = 1
    return c


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- the index format ------------------------------------------------------------------------


def test_index_round_trip_and_bounds() -> None:
    idx = PackIndex(
        [b"\x01" * 32, b"\x02" * 32],
        [IndexEntry(b"abcdefgh", 0, 0, 100, ENC_RAW), IndexEntry(b"ijklmnop", 1, 7, 5, ENC_ZSTD)],
    )
    data = idx.encode()
    assert parse_index(data, max_entries=2) == idx
    with pytest.raises(PackIndexError, match="more than"):
        parse_index(data, max_entries=1)
    with pytest.raises(PackIndexError, match="bytes where"):
        parse_index(data[:-1], max_entries=2)
    with pytest.raises(PackIndexError, match="bytes where"):
        parse_index(data + b"\0", max_entries=2)
    with pytest.raises(PackIndexError, match="magic"):
        parse_index(b"X" + data[1:], max_entries=2)
    with pytest.raises(PackIndexError, match="shorter"):
        parse_index(MAGIC, max_entries=2)

    def bad(entry: IndexEntry) -> bytes:
        return PackIndex([b"\x01" * 32], [entry]).encode()

    with pytest.raises(PackIndexError, match="names pack"):
        parse_index(bad(IndexEntry(b"abcdefgh", 1, 0, 1, ENC_RAW)), max_entries=1)
    with pytest.raises(PackIndexError, match="encoding"):
        parse_index(bad(IndexEntry(b"abcdefgh", 0, 0, 1, 7)), max_entries=1)
    with pytest.raises(PackIndexError, match="length"):
        parse_index(bad(IndexEntry(b"abcdefgh", 0, 0, 0, ENC_RAW)), max_entries=1)
    # A header claiming more entries than there are bytes for is refused before any work.
    with pytest.raises(PackIndexError):
        parse_index(struct.pack("<8sII", MAGIC, 1, 10**9), max_entries=10**9)


def test_plan_joins_runs_and_leaves_disagreeing_entries_to_objects() -> None:
    d = [bytes([i]) * 32 for i in range(6)]
    pack = b"\x09" * 32
    idx = PackIndex(
        [pack],
        [
            IndexEntry(d[0][:8], 0, 0, 100, ENC_RAW),
            IndexEntry(d[1][:8], 0, 100, 100, ENC_RAW),  # adjacent: same range
            IndexEntry(d[2][:8], 0, 10_000_000, 100, ENC_RAW),  # far: another range
            IndexEntry(d[3][:8], 0, 10_000_050, 100, ENC_RAW),  # overlaps the previous entry
            IndexEntry(d[4][:8], 0, 20_000_000, 99, ENC_RAW),  # not the image's size
        ],
    )
    sizes = {x: 100 for x in d}
    jobs, rest = plan(idx, sizes)
    assert [(j.offset, j.length, [e.digest for e in j.entries]) for j in jobs] == [
        (0, 200, [d[0], d[1]]),
        (10_000_000, 100, [d[2]]),
    ]
    assert rest == {d[3], d[4], d[5]}
    # Objects the fetch does not need are not asked for.
    jobs, rest = plan(idx, {d[1]: 100})
    assert [(j.offset, j.length) for j in jobs] == [(100, 100)] and rest == set()


def test_plan_takes_a_zstd_entry_only_when_it_is_smaller_than_the_object() -> None:
    # The writer keeps a frame only where it saves bytes; an index that says otherwise (a
    # "compressed" 64 MiB entry for a 10-byte file) would only make ranges carry junk.
    d = [bytes([i]) * 32 for i in range(3)]
    idx = PackIndex(
        [b"\x09" * 32],
        [
            IndexEntry(d[0][:8], 0, 0, 60, ENC_ZSTD),
            IndexEntry(d[1][:8], 0, 60, 100, ENC_ZSTD),
            IndexEntry(d[2][:8], 0, 160, 64 << 20, ENC_ZSTD),
        ],
    )
    jobs, rest = plan(idx, {x: 100 for x in d})
    assert [[e.digest for e in j.entries] for j in jobs] == [[d[0]]]
    assert rest == {d[1], d[2]}


def test_splitter_cuts_entries_across_chunks_and_skips_gaps() -> None:
    entries = (
        RangeEntry(b"a" * 32, 0, 3, ENC_RAW, 3),
        RangeEntry(b"b" * 32, 5, 4, ENC_RAW, 4),
    )
    got: list[tuple[bytes, bytes, int]] = []
    s = RangeSplitter(entries, lambda e, data, skipped: got.append((e.digest, data, skipped)))
    for chunk in (b"AB", b"Cxx", b"DE", b"FG"):
        s.feed(chunk)
    assert got == [(b"a" * 32, b"ABC", 0), (b"b" * 32, b"DEFG", 2)]
    assert s.pending == ()


def test_decode_refuses_frames_that_are_not_the_image_size() -> None:
    import zstandard

    frame = zstandard.ZstdCompressor().compress(b"x" * 5000)
    assert decode(RangeEntry(b"d" * 32, 0, len(frame), ENC_ZSTD, 5000), frame) == b"x" * 5000
    with pytest.raises(ValueError, match="image says 100"):  # a bomb is stopped at its header
        decode(RangeEntry(b"d" * 32, 0, len(frame), ENC_ZSTD, 100), frame)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 5000)
    with pytest.raises(ValueError):  # ... or once it decompresses past the size
        decode(RangeEntry(b"d" * 32, 0, len(no_size), ENC_ZSTD, 100), no_size)
    with pytest.raises(ValueError):
        decode(RangeEntry(b"d" * 32, 0, 4, ENC_ZSTD, 100), b"junk")
    with pytest.raises(ValueError, match="image says"):
        decode(RangeEntry(b"d" * 32, 0, 3, ENC_RAW, 4), b"abc")


# -- build -----------------------------------------------------------------------------------


def test_build_writes_packs_of_new_small_objects_only(packed: Packed) -> None:
    repo = Repository(packed.root / "raw")
    idx1 = parse_index((repo.root / index_relpath(packed.v1)).read_bytes(), max_entries=10**6)
    idx2 = parse_index((repo.root / index_relpath(packed.v2)).read_bytes(), max_entries=10**6)
    assert len(idx1.packs) == 1 and len(idx2.packs) == 2  # v2: v1's pack plus its own
    assert set(idx1.packs) < set(idx2.packs)
    big = max(repo.iter_objects(), key=lambda d: repo.object_path(d).stat().st_size)
    assert big[:8] not in {e.prefix for e in idx2.entries}  # 2 MiB: above --pack-max-object
    new_pack = (set(idx2.packs) - set(idx1.packs)).pop()
    new_entries = [e for e in idx2.entries if idx2.packs[e.pack] == new_pack]
    assert 0 < len(new_entries) <= 30  # only v2's new objects went into a new pack
    # Every entry holds exactly its object (raw here).
    for e in idx2.entries:
        pack = (repo.root / "packs" / idx2.packs[e.pack].hex()).read_bytes()
        body = pack[e.offset : e.offset + e.length]
        d = next(d for d in repo.iter_objects() if d[:8] == e.prefix)
        assert body == repo.object_path(d).read_bytes()


def test_compressed_packs_are_smaller_for_text(packed: Packed) -> None:
    repo = Repository(packed.root / "zstd")
    text = repo.resolve_ref("text:v1")
    idx = parse_index((repo.root / index_relpath(text)).read_bytes(), max_entries=10**6)
    assert {e.encoding for e in idx.entries} == {ENC_ZSTD}
    # random contents stay raw (no frame saves 5%)
    app = parse_index((repo.root / index_relpath(packed.v1)).read_bytes(), max_entries=10**6)
    assert {e.encoding for e in app.entries} == {ENC_RAW}


def test_a_plain_build_writes_no_packs(packed: Packed) -> None:
    assert not (packed.root / "plain" / "packs").exists()


# -- fetching --------------------------------------------------------------------------------


def fetch(url: str, ref: str, store_dir: Path, **kw: object) -> tuple[Store, object]:
    store = Store(store_dir)
    with client(url, **kw) as c:
        res = c.fetch_image(ref, store)
    assert store.missing_objects(res.image) == set()
    store_is_verified(store_dir)
    return store, res


@pytest.mark.parametrize("layout", ["raw", "zstd"])
def test_cold_fetch_takes_small_objects_from_packs(
    packed: Packed, tmp_path: Path, layout: str
) -> None:
    packed.nginx.clear_log()
    _, res = fetch(packed.url(f"{layout}/"), "app:v1", tmp_path / "s")
    reqs = packed.nginx.requests()
    objects = [u for u, _, _ in reqs if "/objects/" in u]
    ranges = [(u, st) for u, st, _ in reqs if "/packs/" in u and "/index/" not in u]
    assert len(objects) == 1  # the big file (above --pack-max-object); the rest from packs
    assert ranges and all(st == 206 for _, st in ranges)
    assert len(ranges) < 10
    assert res.objects_fetched == res.objects_total  # type: ignore[attr-defined]
    # What the pull reports as downloaded is every body the server sent: the ref (the image),
    # the index, the ranges and the one object.
    assert res.bytes_downloaded == sum(n for _, _, n in reqs)  # type: ignore[attr-defined]


def test_import_pack_writes_packs_a_node_fetches_from(
    packed: Packed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`composefs-csi import --pack`: the imported image gets an index and packs, as `build
    --pack` gives them, and a cold fetch takes its small objects out of them."""
    from tests.ocilayers import E, Layout, layer_tar

    rnd = random.Random(7)
    files = [E("./", "dir"), E("d", "dir")]
    files += [
        E(f"d/f{i:03d}", data=rnd.randbytes(rnd.choice([50, 4000, 30_000]))) for i in range(90)
    ]
    files.append(E("big", data=rnd.randbytes(2 << 20)))  # above --pack-max-object
    src = Layout(tmp_path / "oci")
    source = src.tag("v1", src.image([layer_tar(files)]))
    repo = packed.root / "imported"
    args = ["import", source, "--repo", str(repo), "--ref", "app:v1", "--pack", "--json"]
    assert cli(args) == 0
    out = json.loads(capsys.readouterr().out)
    small = sum(1 for e in files if INLINE_CONTENT_DEFAULT_MAX < len(e.data) < 1 << 20)
    assert small > 40  # files of up to 64 bytes are inline in the image
    assert out["packs"] == [{"objects": small, "written": small, "reused": 0, "new_packs": 1}]
    image = Repository(repo).resolve_ref("app:v1")
    idx = parse_index((repo / index_relpath(image)).read_bytes(), max_entries=10**6)
    assert len(idx.entries) == small

    packed.nginx.clear_log()
    _, res = fetch(packed.url("imported/"), "app:v1", tmp_path / "s")
    reqs = packed.nginx.requests()
    assert [u for u, _, _ in reqs if "/objects/" in u] == [
        f"/imported/objects/{d.hex()[:2]}/{d.hex()[2:]}"
        for d in Repository(repo).iter_objects()
        if (repo / "objects" / d.hex()[:2] / d.hex()[2:]).stat().st_size == 2 << 20
    ]
    assert 0 < len([u for u, _, _ in reqs if "/packs/" in u and "/index/" not in u]) < 5
    assert res.objects_fetched == res.objects_total == small + 1  # type: ignore[attr-defined]

    # A second version imported beside the first gets a pointer and a delta from it, as with
    # build (tests/test_fetch_deltas.py).
    files[5] = E("d/f003", data=b"changed")
    source2 = src.tag("v2", src.image([layer_tar(files)]))
    assert cli(["import", source2, "--repo", str(repo), "--ref", "app:v2", "--pack"]) == 0
    image2 = Repository(repo).resolve_ref("app:v2")
    pointer = parse_pointer((repo / pointer_relpath("app:v2")).read_bytes())
    assert pointer.image == image2 != image and [b for b, _ in pointer.deltas] == [image]
    made = apply_delta(
        (repo / "images" / image.hex()).read_bytes(),
        (repo / delta_relpath(image2, image)).read_bytes(),
        pointer.size,
    )
    assert made == (repo / "images" / image2.hex()).read_bytes()


def test_bad_pack_options_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_bytes(b"x")
    with pytest.raises(SystemExit, match="from 1 to 19"):
        cli(["build", str(tmp_path / "t"), "--repo", str(tmp_path / "r"), "--compress", "30"])
    with pytest.raises(SystemExit, match="at least 1 byte"):
        cli(["build", str(tmp_path / "t"), "--repo", str(tmp_path / "r"), "--pack",
             "--pack-max-object", "0"])  # fmt: skip
    assert not (tmp_path / "r").exists()  # refused before any work


def test_second_version_takes_only_its_new_pack(packed: Packed, tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with client(packed.url("raw/")) as c:
        c.fetch_image("app:v1", store)
        packed.nginx.clear_log()
        res = c.fetch_image("app:v2", store)
    assert store.missing_objects(res.image) == set()
    idx1 = parse_index(
        (packed.root / "raw" / index_relpath(packed.v1)).read_bytes(), max_entries=10**6
    )
    old = idx1.packs[0].hex()
    asked = [u for u, _, _ in packed.nginx.requests() if u.startswith("/raw/packs/")]
    assert asked and not any(old in u for u in asked)
    store_is_verified(store.root)


def test_a_plain_repository_is_fetched_object_by_object(packed: Packed, tmp_path: Path) -> None:
    packed.nginx.clear_log()
    fetch(packed.url("plain/"), "app:v1", tmp_path / "s")
    statuses = {(u.split("/")[2], st) for u, st, _ in packed.nginx.requests()}
    assert ("packs", 404) in statuses  # asked for the index once, found none
    assert not any(seg == "packs" and st != 404 for seg, st in statuses)


def test_a_server_that_ignores_range_still_serves_the_fetch(
    packed: Packed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short ranges, so that most do not start at 0: a whole-pack answer to those is refused
    # (a whole-pack answer to a range that starts at 0 and spans the pack is that range).
    from csi.fetch import objects

    monkeypatch.setattr(objects, "plan", functools.partial(plan, range_max=256 << 10))
    packed.nginx.clear_log()
    fetch(packed.url("norange/"), "app:v1", tmp_path / "s", name="norange")
    statuses = [st for u, st, _ in packed.nginx.requests() if "/packs/" in u and "/index/" not in u]
    assert len(statuses) > 2 and 206 not in statuses
    assert metric("composefs_csi_fetch_pack_ranges_total", repository="norange", result="error")
    # their objects came from objects/ (besides the big one, which always does)
    assert sum("/objects/" in u for u, _, _ in packed.nginx.requests()) > 1


def test_local_repository_with_packs(packed: Packed, tmp_path: Path) -> None:
    fetch(str(packed.root / "zstd"), "text:v1", tmp_path / "s")


def corrupted_copy(src: Path, dst: Path, how: str) -> Repository:
    shutil.copytree(src, dst, symlinks=True)
    repo = Repository(dst)
    for p in (dst / "packs").iterdir():
        if not p.is_file():
            continue
        data = bytearray(p.read_bytes())
        if how == "flip":
            for i in range(100, len(data), 7919):
                data[i] ^= 0x55
            p.write_bytes(bytes(data))
        elif how == "truncate":
            p.write_bytes(bytes(data[: len(data) // 2]))
        elif how == "remove":
            p.unlink()
    return repo


@pytest.mark.parametrize("how", ["flip", "truncate", "remove"])
@pytest.mark.parametrize("layout", ["raw", "zstd"])
def test_bad_packs_fall_back_to_objects(
    packed: Packed, tmp_path: Path, how: str, layout: str
) -> None:
    name = f"bad-{how}-{layout}"
    corrupted_copy(packed.root / layout, packed.root / name, how)
    before = metric("composefs_csi_fetch_digest_mismatches_total", repository=name)
    fetch(packed.url(f"{name}/"), "app:v1", tmp_path / "s", name=name)
    if how == "flip" and layout == "raw":
        assert metric("composefs_csi_fetch_digest_mismatches_total", repository=name) > before


def test_a_lying_index_is_not_trusted(packed: Packed, tmp_path: Path) -> None:
    """An index that places every object at the start of the pack, with the right lengths:
    the entries decode to the image's sizes but not to the objects: none is stored from the
    pack, all come from objects/."""
    repo = corrupted_copy(packed.root / "raw", packed.root / "liar", "none")
    path = repo.root / index_relpath(packed.v1)
    idx = parse_index(path.read_bytes(), max_entries=10**6)
    lie = PackIndex(
        idx.packs, [IndexEntry(e.prefix, e.pack, 0, e.length, e.encoding) for e in idx.entries]
    )
    path.write_bytes(lie.encode())
    fetch(packed.url("liar/"), "app:v1", tmp_path / "s", name="liar")
    assert metric("composefs_csi_fetch_digest_mismatches_total", repository="liar") > 0
