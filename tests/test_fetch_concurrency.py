"""50 fetches of 10 images sharing most objects, all at once: each object is downloaded exactly
once (counted in nginx's access log) and every fetch completes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from csi.fetch import FetchResult, RepositoryClient, RepositoryConfig
from csi.repo import Repository
from csi.store import Store
from tests.fetchkit import make_linktexts, publish, repo_server, store_is_verified
from tests.nginx import NGINX, Nginx

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/setup.sh)")


@pytest.fixture(scope="module")
def ten_images(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Nginx, dict[str, bytes]]]:
    work = tmp_path_factory.mktemp("fetch-conc")
    repo = Repository(work / "repo", create=True)
    rnd = random.Random(5)
    common = {f"c{i:03d}": rnd.randbytes(rnd.choice([200, 4096, 20_000])) for i in range(150)}
    images = {}
    for k in range(10):
        files = dict(common)
        files.update({f"own{k}-{i}": rnd.randbytes(3000) for i in range(15)})
        images[f"img{k}:v1"] = publish(repo, files, f"img{k}:v1")
    make_linktexts(repo.root, work / "links")
    with Nginx(work / "nginx", [repo_server(repo.root, work / "links")], workers=2) as ng:
        yield ng, images


@pytest.mark.parametrize("shared_client", [True, False], ids=["one-client", "client-per-fetch"])
def test_fifty_concurrent_fetches_download_each_object_once(
    ten_images: tuple[Nginx, dict[str, bytes]], tmp_path: Path, shared_client: bool
) -> None:
    ng, images = ten_images
    ng.clear_log()
    store = Store(tmp_path / "store")
    cfg = RepositoryConfig(
        name="conc",
        urls=(f"http://127.0.0.1:{ng.port}/bucket/",),
        allow_plain_http=True,
        concurrency=8,
    )
    refs = [f"img{i % 10}:v1" for i in range(50)]
    one = RepositoryClient(cfg)

    def run(ref: str) -> FetchResult:
        if shared_client:
            return one.fetch_image(ref, store)
        with RepositoryClient(cfg) as c:
            return c.fetch_image(ref, store)

    with ThreadPoolExecutor(50) as ex:
        results = list(ex.map(run, refs))
    one.close()

    wanted: set[bytes] = set()
    for r in results:
        assert r.image == images[r.ref]
        assert store.missing_objects(r.image) == set()
        assert r.objects_fetched + r.objects_present == r.objects_total
        wanted |= store.image_objects(r.image)
    assert sum(r.objects_fetched for r in results) == len(wanted)

    # objects/ serves the objects and, after the images/<hex> link, the 10 images
    counts = ng.request_counts("/bucket/objects/")
    assert len(wanted) == 150 + 10 * 15
    assert len(counts) == len(wanted) + 10
    assert set(counts.values()) == {1}, counts.most_common(3)
    # (a plain repository: the requests for an image's optional pack index, and once the
    # store holds an image for a ref's optional pointer, find none; a ref asked for again once
    # a fetch recorded it is asked conditionally and may get a 304)
    for uri, status, _ in ng.requests():
        if "/packs/index/" not in uri and "/packs/refs/" not in uri:
            assert status == 200 or (status == 304 and "/refs/" in uri), (uri, status)
    # each image link read once; each ref resolved by each of its 5 fetches
    img_counts = ng.request_counts("/bucket/images/")
    assert {n for u, n in img_counts.items() if "/refs/" not in u} == {1}
    assert {n for u, n in img_counts.items() if "/refs/" in u} == {5}
    assert store_is_verified(store.root) == len(wanted) + 10
