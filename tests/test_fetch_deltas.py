"""Image deltas (csi/repo/refdeltas.py, csi/fetch/pointers.py): ``build --pack`` writes, for
each ref it moves, deltas to the new image from images a node is likely to hold and a pointer
naming the image; a node holding one of them resolves the ref through the pointer and makes
the image from the delta. Real nginx on loopback; the checks are on what was requested and
what the store ends up holding.

Nothing of a pointer or a delta is trusted: a pointer left behind by a tool that moved the ref
without it, a corrupt delta, or a repository without pointers all end in the usual resolution
of the ref, with the image the ref really serves.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi.cli.main import main as cli
from csi.fetch import RepositoryClient, RepositoryConfig, RetryPolicy
from csi.fetch.errors import InvalidReference
from csi.image.fsverity import digest_bytes
from csi.metrics import REGISTRY
from csi.repo import Repository
from csi.repo.refdeltas import (
    Pointer,
    PointerError,
    apply_delta,
    delta_relpath,
    make_delta,
    parse_pointer,
    pointer_relpath,
)
from csi.store import Store
from tests.fetchkit import store_is_verified
from tests.nginx import Nginx, static_server

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (scripts/setup.sh installs it)",
)


def write_tree(root: Path, seed: int, n: int) -> None:
    rnd = random.Random(seed)
    for i in range(n):
        p = root / f"d{i // 40}" / f"f{i:04d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rnd.randbytes(rnd.choice([200, 3000, 9000])))


def build(tree: Path, repo: Path, ref: str, *flags: str) -> bytes:
    assert cli(["build", str(tree), "--repo", str(repo), "--ref", ref, *flags]) == 0
    return Repository(repo).resolve_ref(ref)


@dataclass
class World:
    root: Path  # served at /
    v1: bytes
    v2: bytes
    nginx: Nginx

    def url(self, repo: str) -> str:
        return f"http://127.0.0.1:{self.nginx.port}/{repo}/"

    def image(self, repo: str, digest: bytes) -> bytes:
        return (self.root / repo / "images" / digest.hex()).read_bytes()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("deltas")
    write_tree(work / "t1", 1, 400)
    shutil.copytree(work / "t1", work / "t2")
    write_tree(work / "t2" / "d3", 2, 40)  # v2: one folder of 40 files rewritten
    root = work / "srv"
    v1 = build(work / "t1", root / "packed", "app/v1", "--pack")
    v2 = build(work / "t2", root / "packed", "app/v2", "--pack")
    assert build(work / "t1", root / "plain", "app/v1") == v1
    assert build(work / "t2", root / "plain", "app/v2") == v2
    with Nginx(work / "nginx", [static_server(root)]) as ng:
        yield World(root, v1, v2, ng)


def client(url: str, name: str = "deltas") -> RepositoryClient:
    cfg = RepositoryConfig(
        name=name,
        urls=(url,),
        allow_plain_http=True,
        concurrency=4,
        processes=0,
        retries=RetryPolicy(max_attempts=2, base_backoff=0.01, max_backoff=0.02),
    )
    return RepositoryClient(cfg)


def pull(url: str, ref: str, store_dir: Path) -> object:
    store = Store(store_dir)
    try:
        with client(url) as c:
            res = c.fetch_image(ref, store)
        assert store.missing_objects(res.image) == set()
    finally:
        store.close()
    store_is_verified(store_dir)
    return res


def requests_since(w: World, mark: int) -> list[tuple[str, int, int]]:
    return w.nginx.requests()[mark:]


def resolutions(how: str) -> float:
    sample = "composefs_csi_fetch_ref_resolutions_total"
    return REGISTRY.get_sample_value(sample, {"repository": "deltas", "result": how}) or 0.0


# -- the format and the codec -------------------------------------------------------------


def test_pointer_round_trip_and_bounds() -> None:
    p = Pointer(b"\x01" * 32, 4096, [(b"\x02" * 32, 100), (b"\x03" * 32, 7)])
    assert parse_pointer(p.encode()) == p
    assert parse_pointer(Pointer(b"\x01" * 32, 10).encode()).deltas == []
    good = p.encode()
    for bad in (
        b"",
        b"composefs-csi-ref 2\n" + good.split(b"\n", 1)[1],  # another version
        good.replace(b"image 0101", b"image 01zz"),  # not hex
        good.replace(b" 4096\n", b" 0\n"),  # an empty image
        good.replace(b" 4096\n", b" 99999999999999999999\n"),  # absurd size
        good.replace(b" 7\n", b" 0\n"),  # an empty delta
        good + b"delta " + b"04" * 32 + b" 1\n" * 1 + (b"delta " + b"05" * 32 + b" 1\n") * 3,
        good + b"x" * 5000,  # too long
        b"\xff\xfe",
    ):
        with pytest.raises(PointerError):
            parse_pointer(bad)


def test_a_delta_makes_exactly_its_image_or_is_refused() -> None:
    rnd = random.Random(7)
    base = rnd.randbytes(200_000)
    image = base[:50_000] + rnd.randbytes(3000) + base[50_000:]
    delta = make_delta(base, image)
    assert len(delta) < 10_000  # it refers to the base instead of carrying it
    assert apply_delta(base, delta, len(image)) == image
    with pytest.raises(ValueError):
        apply_delta(base, delta, len(image) - 1)  # the pointer says another size
    with pytest.raises(ValueError):
        apply_delta(base, delta[:-20], len(image))  # cut short
    with pytest.raises(ValueError):
        apply_delta(base[:-1] + b"?", delta, len(image))  # a different base: corrupt output
    # A frame that does not say its size may not make more than the pointer's.
    import zstandard

    endless = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 10_000_000)
    with pytest.raises(ValueError):
        apply_delta(base, endless, len(image))


# -- what build writes --------------------------------------------------------------------


def test_build_writes_a_pointer_and_a_delta_from_the_version_beside(world: World) -> None:
    repo = world.root / "packed"
    p1 = parse_pointer((repo / pointer_relpath("app/v1")).read_bytes())
    assert p1.image == world.v1 and p1.deltas == []  # nothing beside it then
    p2 = parse_pointer((repo / pointer_relpath("app/v2")).read_bytes())
    v2_image = world.image("packed", world.v2)
    assert p2.image == world.v2 and p2.size == len(v2_image)
    assert [base for base, _ in p2.deltas] == [world.v1]
    delta = (repo / delta_relpath(world.v2, world.v1)).read_bytes()
    assert p2.deltas[0][1] == len(delta) < len(v2_image) // 4
    assert apply_delta(world.image("packed", world.v1), delta, p2.size) == v2_image
    assert not (world.root / "plain" / "packs").exists()  # only with --pack


# -- fetching -----------------------------------------------------------------------------


def test_a_second_version_comes_as_a_delta(world: World, tmp_path: Path) -> None:
    url = world.url("packed")
    pull(url, "app/v1", tmp_path / "s")
    before = resolutions("pointer")
    mark = len(world.nginx.requests())
    res = pull(url, "app/v2", tmp_path / "s")
    assert res.image == world.v2  # type: ignore[attr-defined]
    reqs = requests_since(world, mark)
    sent = {u.split("/packed/", 1)[1]: (st, n) for u, st, n in reqs}
    assert sent["images/refs/app/v2"] == (206, 1)  # the ref: its first byte only
    assert sent[f"images/{world.v2.hex()}"] == (206, 1)  # ...served as this image
    assert sent[pointer_relpath("app/v2")][0] == 200
    delta_bytes = sent[delta_relpath(world.v2, world.v1)][1]
    assert 0 < delta_bytes < len(world.image("packed", world.v2)) // 4
    # Everything downloaded is counted, and is far less than the image.
    assert res.bytes_downloaded == sum(n for _, _, n in reqs)  # type: ignore[attr-defined]
    assert resolutions("pointer") == before + 1
    # The store holds the image the ref serves, verified (pull() checked every object).
    assert Store(tmp_path / "s").has_image(world.v2)


def test_an_image_the_node_holds_costs_no_body(world: World, tmp_path: Path) -> None:
    url = world.url("packed")
    pull(url, f"sha256:{world.v2.hex()}", tmp_path / "s")  # by digest first
    mark = len(world.nginx.requests())
    res = pull(url, "app/v2", tmp_path / "s")
    assert res.image == world.v2  # type: ignore[attr-defined]
    reqs = requests_since(world, mark)
    assert sum(n for _, _, n in reqs) < 1000, reqs  # two single bytes and the pointer
    assert len(reqs) == 3


def test_an_unchanged_known_ref_costs_one_small_request(world: World, tmp_path: Path) -> None:
    url = world.url("packed")
    pull(url, "app/v1", tmp_path / "s")
    pull(url, "app/v2", tmp_path / "s")
    mark = len(world.nginx.requests())
    res = pull(url, "app/v2", tmp_path / "s")
    assert res.image == world.v2  # type: ignore[attr-defined]
    assert [(st, n) for _, st, n in requests_since(world, mark)] == [(304, 0)]


def test_a_pointer_left_behind_is_not_trusted(world: World, tmp_path: Path) -> None:
    """Another tool moved the ref back to v1 and left the pointer saying v2: the node gets
    what the ref serves."""
    repo = tmp_path / "repo"
    shutil.copytree(world.root / "packed", repo, symlinks=True)
    Repository(repo).set_ref("app/v2", world.v1)  # the pointer still names v2
    assert parse_pointer((repo / pointer_relpath("app/v2")).read_bytes()).image == world.v2
    with Nginx(tmp_path / "nginx", [static_server(tmp_path)]) as ng:
        url = f"http://127.0.0.1:{ng.port}/repo/"
        pull(url, f"sha256:{world.v2.hex()}", tmp_path / "s")  # the node holds both
        pull(url, f"sha256:{world.v1.hex()}", tmp_path / "s")
        res = pull(url, "app/v2", tmp_path / "s")
    assert res.image == world.v1  # type: ignore[attr-defined]


def test_a_corrupt_delta_falls_back_to_the_ref(world: World, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(world.root / "packed", repo, symlinks=True)
    path = repo / delta_relpath(world.v2, world.v1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    with Nginx(tmp_path / "nginx", [static_server(tmp_path)]) as ng:
        url = f"http://127.0.0.1:{ng.port}/repo/"
        pull(url, "app/v1", tmp_path / "s")
        mark = len(ng.requests())
        res = pull(url, "app/v2", tmp_path / "s")
        full = [(u, st) for u, st, n in ng.requests()[mark:] if u.endswith("/images/refs/app/v2")]
    assert res.image == world.v2  # type: ignore[attr-defined]
    assert full == [("/repo/images/refs/app/v2", 206), ("/repo/images/refs/app/v2", 200)]


def test_a_repository_without_pointers_is_asked_once(world: World, tmp_path: Path) -> None:
    url = world.url("plain")
    pull(url, "app/v1", tmp_path / "s")
    mark = len(world.nginx.requests())
    res = pull(url, "app/v2", tmp_path / "s")
    assert res.image == world.v2  # type: ignore[attr-defined]
    reqs = requests_since(world, mark)
    assert [u for u, st, _ in reqs if st == 404] == [f"/plain/{pointer_relpath('app/v2')}"]
    # Within the next 10 minutes this process asks for refs as before: one request.
    mark = len(world.nginx.requests())
    pull(url, "app/v1", tmp_path / "s2")
    pull(url, f"sha256:{world.v1.hex()}", tmp_path / "s")
    mark = len(world.nginx.requests())
    pull(url, "app/v2", tmp_path / "s")
    assert [st for _, st, _ in requests_since(world, mark)] == [304]
    assert digest_bytes(world.image("plain", world.v2)) == world.v2


def test_a_bad_ref_name_is_refused_before_any_request(world: World, tmp_path: Path) -> None:
    url = world.url("packed")
    pull(url, "app/v1", tmp_path / "s")  # the node holds an image: pointers would be tried
    mark = len(world.nginx.requests())
    store = Store(tmp_path / "s")
    with client(url) as c, pytest.raises(InvalidReference):
        c.fetch_image("../../packs/refs/app/v1", store)
    store.close()
    assert requests_since(world, mark) == []


def test_bases_are_the_refs_previous_image_and_its_siblings(tmp_path: Path) -> None:
    from csi.repo.refdeltas import choose_bases

    repo = Repository(tmp_path / "repo", create=True)
    digests = {}
    for i, name in enumerate(["app:v1", "db:v1", "team/x/a", "team/x/b", "team/y/c", "lone"]):
        tree = tmp_path / f"t{i}"
        write_tree(tree, 10 + i, 3)
        digests[name] = build(tree, repo.root, name)
    new = b"\x07" * 32
    # At the top, the same name before ':' (not every ref at the top); below, the same folder
    # (not another folder, even for the same name).
    assert choose_bases(repo, "app:v2", new) == [digests["app:v1"]]
    assert choose_bases(repo, "team/x/c", new) == [digests["team/x/b"], digests["team/x/a"]]
    assert choose_bases(repo, "team/y/a", new) == [digests["team/y/c"]]
    # A ref that moves: its own image first.
    assert choose_bases(repo, "team/x/a", new)[0] == digests["team/x/a"]
    assert choose_bases(repo, "other", new) == []
