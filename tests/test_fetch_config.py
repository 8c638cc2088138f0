"""Reference grammar, ref symlink targets and repository configuration (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi.fetch import (
    BasicAuth,
    BearerAuth,
    ConfigError,
    InvalidReference,
    RepositoryConfig,
    parse_digest,
    validate_ref_name,
)
from csi.fetch.client import RepositoryClient
from csi.fetch.config import RetryPolicy, display_url
from csi.fetch.refs import parse_ref_target

HEX = "ab" * 32


def test_digest_references() -> None:
    assert parse_digest("sha256:" + HEX) == bytes.fromhex(HEX)
    assert parse_digest("sha256:" + HEX.upper()) == bytes.fromhex(HEX)
    assert parse_digest(HEX) == bytes.fromhex(HEX)
    assert parse_digest("app:v1") is None
    with pytest.raises(InvalidReference):
        parse_digest("sha256:" + HEX[:-1])
    with pytest.raises(InvalidReference):
        parse_digest("sha256:" + "zz" * 32)


@pytest.mark.parametrize(
    "name", ["app", "app:v1", "models/llama-3-8b:v2", "a.b_c+d@e=f", "x" * 128]
)
def test_good_ref_names(name: str) -> None:
    assert validate_ref_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        ".",
        "a/..",
        "../a",
        "/a",
        "a/",
        "a//b",
        "a\\b",
        "a b",
        "a\nb",
        "é",
        "a?b",
        "a%2e",
        "x" * 129,
        "/".join("a" * 9),
        "a/" * 200 + "a",
    ],
)
def test_bad_ref_names(name: str) -> None:
    with pytest.raises(InvalidReference):
        validate_ref_name(name)


def test_ref_targets() -> None:
    assert parse_ref_target("app", f"../{HEX}\n") == bytes.fromhex(HEX)
    assert parse_ref_target("a/b", f"../../{HEX}") == bytes.fromhex(HEX)
    for name, target in [
        ("app", f"../../{HEX}"),  # escapes images/
        ("a/b", f"../{HEX}"),  # points into refs/
        ("app", HEX),
        ("app", f"/{HEX}"),
        ("app", f"../objects/ab/{HEX[2:]}"),
        ("app", f"../{HEX.upper()}"),
        ("app", f"../{HEX}/x"),
        ("app", ""),
    ]:
        with pytest.raises(ValueError):
            parse_ref_target(name, target)


def test_plain_http_needs_permission() -> None:
    with pytest.raises(ConfigError, match="allow_plain_http"):
        RepositoryConfig(name="r", urls=("http://example.invalid/",))
    RepositoryConfig(name="r", urls=("http://example.invalid/",), allow_plain_http=True)
    RepositoryConfig(name="r", urls=("https://example.invalid/", "/srv/repo", "file:///srv/r"))


@pytest.mark.parametrize(
    "url",
    [
        "https://user:hunter2@example.invalid/",
        "ftp://example.invalid/",
        "relative/path",
        "https://example.invalid/?sig=hunter2",
        "file://otherhost/x",
        "https:///nohost",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError) as ei:
        RepositoryConfig(name="r", urls=(url,))
    assert "hunter2" not in str(ei.value)


def test_display_url_hides_everything_but_host() -> None:
    assert display_url("https://repo.example:8443/a/b/") == "https://repo.example:8443"
    assert display_url("/srv/repo") == "/srv/repo"


def test_repr_never_shows_secrets(tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("s3cret-token\n")
    pw = tmp_path / "pw"
    pw.write_text("s3cret-pass")
    for auth in (BearerAuth(tok), BasicAuth("bob", pw)):
        c = RepositoryConfig(name="r", urls=("https://h.example/x/",), auth=auth)
        for text in (repr(c), str(c), repr(auth), repr(RepositoryClient(c))):
            assert "s3cret" not in text
    assert BearerAuth(tok).token() == "s3cret-token"
    assert BasicAuth("bob", pw).password() == "s3cret-pass"
    tok.write_text("")
    with pytest.raises(ConfigError) as ei:
        BearerAuth(tok).token()
    assert str(tok) in str(ei.value)
    with pytest.raises(ConfigError):
        BearerAuth(tmp_path / "absent").token()


def test_from_dict() -> None:
    c = RepositoryConfig.from_dict(
        {
            "name": "models",
            "urls": ["https://a.example/", "https://b.example/"],
            "auth": {"type": "basic", "username": "u", "password_file": "/run/pw"},
            "ca_bundle": "/etc/ca.pem",
            "timeouts": {"connect": 1, "read": 2, "total": 3},
            "retries": {"max_attempts": 2},
            "concurrency": 4,
        }
    )
    assert c.urls == ("https://a.example/", "https://b.example/")
    assert isinstance(c.auth, BasicAuth) and c.auth.password_file == Path("/run/pw")
    assert c.timeouts.read == 2 and c.retries.max_attempts == 2 and c.concurrency == 4
    with pytest.raises(ConfigError, match="unknown keys"):
        RepositoryConfig.from_dict({"name": "x", "urls": ["/r"], "bogus": 1})


def test_backoff_grows_and_is_capped() -> None:
    c = RepositoryConfig(
        name="r",
        urls=("/r",),
        retries=RetryPolicy(base_backoff=1, max_backoff=5, jitter=0.5, max_retry_after=7),
    )
    no_jitter = RepositoryClient(c, rng=lambda: 0.0)
    full = RepositoryClient(c, rng=lambda: 1.0)
    assert [no_jitter.mirrors.backoff(i, None) for i in range(5)] == [1, 2, 4, 5, 5]
    assert [full.mirrors.backoff(i, None) for i in range(3)] == [0.5, 1, 2]
    assert no_jitter.mirrors.backoff(0, 3.0) == 3.0
    assert no_jitter.mirrors.backoff(0, 300.0) == 7.0
    no_jitter.close()
    full.close()


def test_processes_setting() -> None:
    base = {"name": "r", "urls": ["https://example.org/repo/"]}
    assert RepositoryConfig.from_dict(base).processes is None  # automatic
    assert RepositoryConfig.from_dict({**base, "processes": 0}).processes == 0
    assert "processes=3" in repr(RepositoryConfig.from_dict({**base, "processes": 3}))
    with pytest.raises(ConfigError, match="processes must not be negative"):
        RepositoryConfig.from_dict({**base, "processes": -1})
    from csi.fetch.bulk import default_processes

    assert 1 <= default_processes(16) <= 8
    assert default_processes(1) == 1
