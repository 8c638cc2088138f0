"""Refs that cost nothing when unchanged and survive an outage (issue 14): conditional requests
with the validators the node store keeps, the node's last resolution when every mirror is
unreachable (within the configured staleness), and digest fetches of local images that never
touch the network. Real nginx; the outage is a stopped latency proxy in front of it."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.fetch import NotFound, RepositoryClient, RepositoryConfig, RetryPolicy, Unreachable
from csi.metrics import REGISTRY
from csi.repo import Repository
from csi.store import Store
from tests.fetchkit import World, make_files, publish, serve_world
from tests.support.latency import LatencyProxy

pytestmark = pytest.mark.skipif(
    __import__("shutil").which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (scripts/setup.sh installs it)",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serve_world(tmp_path_factory.mktemp("fetch-refs")) as w:
        yield w


def client(*urls: str, name: str = "refs", **kw: object) -> RepositoryClient:
    cfg = RepositoryConfig(
        name=name,
        urls=urls,
        allow_plain_http=True,
        retries=RetryPolicy(max_attempts=2, base_backoff=0.01, max_backoff=0.02),
        **kw,  # type: ignore[arg-type]
    )
    return RepositoryClient(cfg)


def resolutions(name: str, result: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "composefs_csi_fetch_ref_resolutions_total", {"repository": name, "result": result}
        )
        or 0.0
    )


def ref_requests(world: World, ref: str) -> list[tuple[int, int]]:
    return [(st, n) for u, st, n in world.nginx.requests() if u.endswith(f"/images/refs/{ref}")]  # type: ignore[attr-defined]


@pytest.mark.parametrize("prefix", ["", "bucket/"], ids=["image-body", "symlink-text"])
def test_an_unchanged_ref_costs_one_304(world: World, tmp_path: Path, prefix: str) -> None:
    name = f"refs-304-{len(prefix)}"
    store = Store(tmp_path / "s")
    with client(world.url(prefix), name=name) as c:
        first = c.fetch_image("app:v1", store)
        world.nginx.clear_log()  # type: ignore[attr-defined]
        before = resolutions(name, "not_modified")
        again = c.fetch_image("app:v1", store)
        assert c.resolve("app:v1", store) == first.image
    assert again.image == first.image
    assert again.bytes_downloaded == 0 and not again.image_fetched
    assert ref_requests(world, "app:v1") == [(304, 0), (304, 0)]
    assert resolutions(name, "not_modified") == before + 2
    assert {u for u, _, _ in world.nginx.requests()} == {f"/{prefix}images/refs/app:v1"}  # type: ignore[attr-defined]


def test_a_moved_ref_is_answered_in_full(tmp_path: Path) -> None:
    """Two images of the same size, built within the same second: nginx derives a ref's ETag
    from the image file's mtime and size, and a new image file gets a second of its own, so
    the move is seen."""
    from tests.nginx import Nginx, static_server

    repo = Repository(tmp_path / "repo", create=True)
    a = publish(repo, {"f": b"a" * 1000}, "moving")
    b = publish(repo, {"f": b"b" * 1000}, None)
    assert repo.image_path(a).stat().st_size == repo.image_path(b).stat().st_size
    assert repo.image_path(a).stat().st_mtime != repo.image_path(b).stat().st_mtime
    store = Store(tmp_path / "s")
    with Nginx(tmp_path / "ng", [static_server(repo.root)]) as ng, client(ng_url(ng)) as c:
        assert c.resolve("moving", store) == a
        repo.set_ref("moving", b)
        assert c.resolve("moving", store) == b
        assert c.resolve("moving", store) == b
        asked = [(u, st) for u, st, _ in ng.requests() if "/refs/" in u]
    # The move is seen by the first byte of the ref (206, not 304); this repository has no
    # pointer for it (packs/refs/, csi/fetch/pointers.py), so the ref is asked for in full.
    assert asked == [
        ("/images/refs/moving", 200),
        ("/images/refs/moving", 206),
        ("/packs/refs/moving", 404),
        ("/images/refs/moving", 200),
        ("/images/refs/moving", 304),
    ]


def ng_url(ng: object) -> str:
    return f"http://127.0.0.1:{ng.port}/"  # type: ignore[attr-defined]


def test_resolve_with_a_store_keeps_the_image_it_was_answered_with(
    world: World, tmp_path: Path
) -> None:
    store = Store(tmp_path / "s")
    with client(world.url(), name="refs-keep") as c:
        digest = c.resolve("app:v1", store)
        assert store.has_image(digest)
        world.nginx.clear_log()  # type: ignore[attr-defined]
        c.fetch_image("sha256:" + digest.hex(), store, objects=False)
    assert world.nginx.requests() == []  # type: ignore[attr-defined]


@pytest.fixture()
def outage(world: World) -> Iterator[LatencyProxy]:
    """A proxy in front of the world's nginx that the test stops to cut the repository off."""
    with LatencyProxy(world.port, 0.005) as p:
        yield p


def test_an_unreachable_repository_serves_refs_this_node_resolved(
    world: World, outage: LatencyProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path / "s")
    name = "refs-offline"
    with client(outage.url(), name=name) as c:
        first = c.fetch_image("app:v1", store)
    outage.stop()
    before = resolutions(name, "offline")
    caplog.set_level(logging.WARNING, logger="csi.fetch")
    with client(outage.url(), name=name) as c:
        again = c.fetch_image("app:v1", store)  # by ref
        assert c.resolve("app:v1", store) == first.image
        by_digest = c.fetch_image("sha256:" + first.image.hex(), store)
        with pytest.raises(Unreachable):  # a ref this node never resolved
            c.fetch_image("nested/app:v2", store)
    assert again.image == first.image and again.bytes_downloaded == 0
    assert by_digest.objects_fetched == 0
    assert resolutions(name, "offline") == before + 2
    assert "unreachable" in caplog.text and first.image.hex() in caplog.text
    # An offline resolution is not a confirmation: the record keeps its time.
    rec = store.ref_record(name, "app:v1")
    assert rec is not None and rec.checked < time.time()


def test_offline_refs_can_be_turned_off_or_limited(
    world: World, outage: LatencyProxy, tmp_path: Path
) -> None:
    store = Store(tmp_path / "s")
    with client(outage.url(), name="refs-strict") as c:
        c.fetch_image("app:v1", store)
    outage.stop()
    with (
        client(outage.url(), name="refs-strict", offline_refs=False) as c,
        pytest.raises(Unreachable, match="offline_refs is off"),
    ):
        c.resolve("app:v1", store)
    with (
        client(outage.url(), name="refs-strict", offline_max_staleness=0.0) as c,
        pytest.raises(Unreachable, match="offline_max_staleness"),
    ):
        c.resolve("app:v1", store)
    with client(outage.url(), name="refs-strict", offline_max_staleness=None) as c:
        assert c.resolve("app:v1", store) == store.get_ref("refs-strict", "app:v1")


def test_a_ref_the_repository_no_longer_has_is_not_served_from_memory(
    tmp_path: Path,
) -> None:
    from tests.nginx import Nginx, static_server

    repo = Repository(tmp_path / "repo", create=True)
    publish(repo, make_files(5, 3), "gone")
    store = Store(tmp_path / "s")
    with Nginx(tmp_path / "ng", [static_server(repo.root)]) as ng, client(ng_url(ng)) as c:
        c.fetch_image("gone", store)
        repo.remove_ref("gone")
        with pytest.raises(NotFound):  # an answer, not an outage
            c.resolve("gone", store)


def test_a_local_digest_volume_never_touches_the_network(world: World, tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with client(world.url(), name="refs-local") as c:
        res = c.fetch_image("app:v1", store)
    # Nothing listens at this URL any more: any request would fail.
    with LatencyProxy(world.port, 0) as dead:
        url = dead.url()
    with client(url, name="refs-local") as c:
        again = c.fetch_image("sha256:" + res.image.hex(), store)
        assert c.resolve("sha256:" + res.image.hex(), store) == res.image
    assert again.bytes_downloaded == 0 and again.objects_fetched == 0


def test_stores_from_before_keep_their_refs(tmp_path: Path) -> None:
    """A store whose refs table predates the validators gains the columns on open."""
    root = tmp_path / "s"
    Store(root).close()
    db = root / "state.db"
    con = sqlite3.connect(db)
    con.execute("DROP TABLE refs")
    con.execute(
        "CREATE TABLE refs(repository TEXT NOT NULL, name TEXT NOT NULL, digest BLOB NOT NULL, "
        "updated REAL NOT NULL, PRIMARY KEY(repository, name)) WITHOUT ROWID"
    )
    con.execute("INSERT INTO refs VALUES ('r', 'old', ?, 1000.0)", (b"\x07" * 32,))
    con.commit()
    con.close()
    with Store(root) as store:
        rec = store.ref_record("r", "old")
        assert rec is not None and rec.digest == b"\x07" * 32 and rec.checked == 1000.0
        assert rec.etag is None and rec.source is None
        store.set_ref("r", "old", b"\x08" * 32, etag='"x"', source="http://h")
        rec = store.ref_record("r", "old")
        assert rec is not None and rec.etag == '"x"' and rec.checked > 1000.0
    assert os.path.exists(db)
