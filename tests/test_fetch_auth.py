"""Bearer and basic auth checked by nginx, HTTPS with a private CA and client certificates;
credentials never appear in errors or logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.fetch import (
    AccessDenied,
    BadResponse,
    BasicAuth,
    BearerAuth,
    FetchError,
    RepositoryConfig,
    fetch_image,
)
from csi.store import Store
from tests.fetchkit import (
    BASIC_PASSWORD,
    BASIC_USER,
    BEARER_TOKEN,
    World,
    serve_world,
    store_is_verified,
)
from tests.nginx import NGINX

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/setup.sh)")

SECRETS = (BEARER_TOKEN, BASIC_PASSWORD, "wrong-token-123", "wrong-pass-456")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serve_world(tmp_path_factory.mktemp("fetch-auth")) as w:
        yield w


def secret_file(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text + "\n")
    p.chmod(0o600)
    return p


def no_secrets(*texts: str) -> None:
    for t in texts:
        for s in SECRETS:
            assert s not in t


def fetch(world: World, tmp_path: Path, url: str, **kw: object) -> None:
    cfg = RepositoryConfig(name="private", urls=(url,), allow_plain_http=True, **kw)  # type: ignore[arg-type]
    store = Store(tmp_path / "store")
    res = fetch_image(cfg, "app:v1", store)
    assert store.missing_objects(res.image) == set()
    store_is_verified(store.root)


def test_bearer(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = BearerAuth(secret_file(tmp_path, "tok", BEARER_TOKEN))
    fetch(world, tmp_path, world.url("bearer/"), auth=good)
    bad = BearerAuth(secret_file(tmp_path, "bad", "wrong-token-123"))
    with pytest.raises(AccessDenied) as ei:
        fetch(world, tmp_path / "2", world.url("bearer/"), auth=bad)
    assert "repository 'private'" in str(ei.value) and "401" in str(ei.value)
    with pytest.raises(AccessDenied):
        fetch(world, tmp_path / "3", world.url("bearer/"))
    no_secrets(str(ei.value), repr(ei.value), caplog.text)


def test_basic(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = BasicAuth(BASIC_USER, secret_file(tmp_path, "pw", BASIC_PASSWORD))
    fetch(world, tmp_path, world.url("basic/"), auth=good)
    bad = BasicAuth(BASIC_USER, secret_file(tmp_path, "bad", "wrong-pass-456"))
    with pytest.raises(AccessDenied) as ei:
        fetch(world, tmp_path / "2", world.url("basic/"), auth=bad)
    no_secrets(str(ei.value), repr(ei.value), caplog.text)


def test_token_is_reread_from_its_file(world: World, tmp_path: Path) -> None:
    tok = secret_file(tmp_path, "tok", "wrong-token-123")
    with pytest.raises(AccessDenied):
        fetch(world, tmp_path / "1", world.url("bearer/"), auth=BearerAuth(tok))
    secret_file(tmp_path, "tok", BEARER_TOKEN)
    fetch(world, tmp_path / "2", world.url("bearer/"), auth=BearerAuth(tok))


def test_https_with_custom_ca(world: World, tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{world.tls_port}/"
    fetch(world, tmp_path, url, ca_bundle=world.tls.ca_cert)


def test_https_rejects_unknown_ca(world: World, tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{world.tls_port}/"
    with pytest.raises(FetchError) as ei:
        fetch(world, tmp_path, url)
    assert isinstance(ei.value, BadResponse) and "TLS" in str(ei.value)


def test_client_certificate(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"https://127.0.0.1:{world.tls_port}/mtls/"
    fetch(
        world,
        tmp_path,
        url,
        ca_bundle=world.tls.ca_cert,
        client_cert=world.tls.client_cert,
        client_key=world.tls.client_key,
    )
    with pytest.raises(AccessDenied):
        fetch(world, tmp_path / "2", url, ca_bundle=world.tls.ca_cert)


def test_https_with_bearer_never_downgrades(world: World, tmp_path: Path) -> None:
    # An https repository is not allowed to redirect to plain http even if the config allows
    # http elsewhere: the protocol set is fixed by the repository URL's scheme.
    from csi.fetch.http import HttpSource

    cfg = RepositoryConfig(
        name="p", urls=(f"https://127.0.0.1:{world.tls_port}/",), allow_plain_http=True
    )
    src = HttpSource(cfg.urls[0], cfg)
    import pycurl

    assert src._protocols == pycurl.PROTO_HTTPS


def test_credentials_and_tls_in_worker_processes(world: World, tmp_path: Path) -> None:
    # Bulk fetches run in worker processes and batch their requests (HttpSource.get_many):
    # the same credentials, CA bundle and client certificate apply there.
    from csi.fetch import RepositoryClient

    def bulk_fetch(url: str, store_dir: Path, **kw: object) -> None:
        cfg = RepositoryConfig(
            name="private-bulk",
            urls=(url,),
            allow_plain_http=True,
            concurrency=4,
            processes=2,
            **kw,  # type: ignore[arg-type]
        )
        store = Store(store_dir)
        with RepositoryClient(cfg) as c:
            c.bulk_min_objects = 1
            res = c.fetch_image("app:v1", store)
        assert store.missing_objects(res.image) == set()
        store_is_verified(store.root)

    tok = BearerAuth(secret_file(tmp_path, "tok", BEARER_TOKEN))
    bulk_fetch(world.url("bearer/"), tmp_path / "1", auth=tok)
    bad = BearerAuth(secret_file(tmp_path, "bad", "wrong-token-123"))
    with pytest.raises(AccessDenied):
        bulk_fetch(world.url("bearer/"), tmp_path / "2", auth=bad)
    bulk_fetch(
        f"https://127.0.0.1:{world.tls_port}/mtls/",
        tmp_path / "3",
        ca_bundle=world.tls.ca_cert,
        client_cert=world.tls.client_cert,
        client_key=world.tls.client_key,
    )
