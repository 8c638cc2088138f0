"""Fetching from a real nginx on loopback: refs both ways, digests, mirrors, local sources,
progress, dedup, clear errors."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.fetch import (
    FetchProgress,
    InvalidReference,
    NotFound,
    RepositoryClient,
    RepositoryConfig,
    fetch_image,
    pull,
    resolve,
)
from csi.store import Store
from tests.fetchkit import World, dead_port, object_rel, serve_world, store_is_verified

pytestmark = pytest.mark.skipif(
    __import__("shutil").which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (scripts/setup.sh installs it)",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serve_world(tmp_path_factory.mktemp("fetch-world")) as w:
        yield w


def cfg(*urls: str, **kw: object) -> RepositoryConfig:
    kw.setdefault("allow_plain_http", True)
    return RepositoryConfig(name="test", urls=urls, **kw)  # type: ignore[arg-type]


def expected_objects(world: World, ref: str) -> int:
    return len({d for d in world.files[ref].values() if len(d) > 64})


@pytest.mark.parametrize("prefix", ["", "bucket/"], ids=["followed-symlinks", "symlink-target"])
def test_fetch_by_ref_both_ways(world: World, tmp_path: Path, prefix: str) -> None:
    store = Store(tmp_path / "store")
    prog = FetchProgress()
    res = fetch_image(cfg(world.url(prefix)), "app:v1", store, prog)
    assert res.image == world.images["app:v1"]
    assert res.objects_fetched == res.objects_total == expected_objects(world, "app:v1")
    assert res.objects_present == 0
    assert store.missing_objects(res.image) == set()
    assert store.get_ref("test", "app:v1") == res.image
    snap = prog.snapshot()
    assert snap.phase == "done"
    assert snap.objects_done == snap.objects_total == res.objects_total
    assert (
        snap.bytes_total
        == snap.bytes_done
        == sum(len(d) for d in world.files["app:v1"].values() if len(d) > 64)
    )
    assert snap.bytes_downloaded == res.bytes_downloaded >= snap.bytes_total
    assert store_is_verified(store.root) == res.objects_total + 1  # objects + the image


def test_nested_ref_and_digest(world: World, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with RepositoryClient(cfg(world.url("bucket/"))) as client:
        d = world.images["nested/app:v2"]
        assert client.resolve("nested/app:v2") == d
        assert client.resolve("sha256:" + d.hex()) == d
        assert client.resolve(d.hex()) == d
        res = client.fetch_image("sha256:" + d.hex(), store)
    assert res.image == d and store.missing_objects(d) == set()
    assert store.get_ref("test", "sha256:" + d.hex()) is None  # digests are not refs


def test_second_image_downloads_only_new_objects(world: World, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with RepositoryClient(cfg(world.url())) as client:
        first = client.fetch_image("app:v1", store)
        again = client.fetch_image("app:v1", store)
        second = client.fetch_image("nested/app:v2", store)
    assert again.objects_fetched == 0 and again.objects_present == first.objects_total
    assert not again.image_fetched
    shared = set(world.files["app:v1"].values()) & set(world.files["nested/app:v2"].values())
    new = {v for v in world.files["nested/app:v2"].values() if len(v) > 64} - shared
    assert second.objects_fetched == len(new)
    assert second.objects_present == second.objects_total - len(new)
    image_size = (world.repo_root / "images" / second.image.hex()).stat().st_size
    assert second.bytes_downloaded == sum(len(v) for v in new) + image_size


@pytest.mark.parametrize("kind", ["path", "file-url"])
def test_local_repositories(world: World, tmp_path: Path, kind: str) -> None:
    url = str(world.repo_root) if kind == "path" else "file://" + str(world.repo_root)
    store = Store(tmp_path / "store")
    res = fetch_image(cfg(url), "nested/app:v2", store)
    assert res.image == world.images["nested/app:v2"]
    assert store.missing_objects(res.image) == set()
    assert resolve(cfg(url), "app:v1") == world.images["app:v1"]
    with pytest.raises(NotFound, match="repository 'test': ref 'nope'"):
        resolve(cfg(url), "nope")


def test_missing_ref_is_not_found(world: World) -> None:
    with pytest.raises(NotFound) as ei:
        resolve(cfg(world.url()), "no-such:tag")
    msg = str(ei.value)
    assert "repository 'test'" in msg and "ref 'no-such:tag'" in msg and "404" in msg
    assert ei.value.code == "NOT_FOUND"


@pytest.mark.parametrize(
    "ref", ["../etc/passwd", "/abs", "a/../../b", "a//b", "sha256:abc", "x" * 300, "a b", "é"]
)
def test_bad_refs_rejected_without_request(world: World, ref: str) -> None:
    with pytest.raises(InvalidReference) as ei:
        resolve(cfg(world.url()), ref)
    assert ei.value.code == "INVALID_ARGUMENT"
    # Nothing asked for it (matched by content: other tests' requests may still be logged late).
    quoted = urllib.parse.quote(ref, safe="/:")
    asked = [u for u, _, _ in world.nginx.requests() if "/refs/" in u and (quoted in u or ref in u)]  # type: ignore[attr-defined]
    assert asked == []


def test_missing_object_names_repository_and_object(world: World, tmp_path: Path) -> None:
    # A copy of the repository with one object removed, served from a local path.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(world.repo_root, copy, symlinks=True)
    victim = max(world.files["app:v1"].values(), key=len)
    from csi.image.fsverity import digest_bytes

    d = digest_bytes(victim)
    (copy / object_rel(d)).unlink()
    store = Store(tmp_path / "store")
    with pytest.raises(NotFound) as ei:
        fetch_image(cfg(str(copy)), "app:v1", store)
    assert f"object {d.hex()}" in str(ei.value) and "repository 'test'" in str(ei.value)
    assert not store.has_object(d)
    store_is_verified(store.root)


def test_mirrors_fail_over(world: World, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    dead = f"http://127.0.0.1:{dead_port()}/"
    missing = world.url("no-such-dir/")
    res = fetch_image(cfg(dead, missing, world.url()), "app:v1", store)
    assert res.objects_fetched == res.objects_total
    assert store.missing_objects(res.image) == set()


def test_pull_function_for_cli(world: World, tmp_path: Path) -> None:
    seen = []
    res = pull(
        "app:v1",
        world.url("bucket/"),
        tmp_path / "store",
        concurrency=4,
        on_progress=seen.append,
        allow_plain_http=True,
    )
    assert res.objects_fetched == res.objects_total
    assert seen[-1].phase == "done" and seen[-1].objects_done == res.objects_total
    assert any(s.phase == "objects" for s in seen)


@pytest.mark.parametrize("prefix", ["", "bucket/"], ids=["followed-symlinks", "symlink-target"])
def test_image_only_fetch_for_lazy_volumes(world: World, tmp_path: Path, prefix: str) -> None:
    def object_requests() -> int:
        return sum(1 for uri, _, _ in world.nginx.requests() if "/objects/" in uri)  # type: ignore[attr-defined]

    store = Store(tmp_path / "store")
    before = object_requests()
    with RepositoryClient(cfg(world.url(prefix))) as client:
        res = client.fetch_image("app:v1", store, objects=False)
        assert res.image == world.images["app:v1"]
        assert res.objects_fetched == 0
        assert res.objects_total == expected_objects(world, "app:v1")
        assert store.has_image(res.image)
        assert store.missing_objects(res.image) == store.image_objects(res.image)
        assert store.get_ref("test", "app:v1") == res.image
        assert object_requests() - before <= 1  # at most the image, when served as a link
        # Completing later fetches exactly what is missing.
        full = client.fetch_image("app:v1", store)
        assert full.objects_fetched == expected_objects(world, "app:v1")
    assert not store.missing_objects(res.image)
    store_is_verified(tmp_path / "store")
