"""HttpSource passes a body on in a few large pieces (not one per 16 KiB libcurl chunk), and
still passes on exactly what arrived when a transfer fails half-way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.fetch import RepositoryConfig, RetryPolicy, Timeouts
from csi.fetch import http as fetch_http
from csi.fetch.errors import (
    SourceBadResponse,
    SourceDenied,
    SourceNotFound,
    SourceTimeout,
    SourceTransient,
)
from csi.fetch.http import HttpSource
from csi.image.fsverity import digest_bytes
from tests.fetchkit import Fault, FaultProxy, World, serve_world

pytestmark = pytest.mark.skipif(
    __import__("shutil").which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (scripts/setup.sh installs it)",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serve_world(tmp_path_factory.mktemp("fetch-buffering")) as w:
        yield w


def source(url: str, read: float = 30) -> HttpSource:
    cfg = RepositoryConfig(
        name="buf",
        urls=(url,),
        allow_plain_http=True,
        timeouts=Timeouts(connect=5, read=read, total=60),
        retries=RetryPolicy(max_attempts=1),
    )
    return HttpSource(url, cfg)


def big(world: World) -> tuple[str, bytes]:
    body = world.files["app:v1"]["big"]  # 3 MiB
    h = digest_bytes(body).hex()
    return f"objects/{h[:2]}/{h[2:]}", body


def test_body_passed_on_in_few_pieces(world: World) -> None:
    rel, body = big(world)
    pieces: list[bytes] = []
    src = source(world.url())
    try:
        resp = src.get(rel, pieces.append)
    finally:
        src.close()
    assert resp.size == len(body)
    assert b"".join(pieces) == body
    # libcurl hands over 16 KiB at a time (192 chunks for 3 MiB); they are gathered.
    assert len(pieces) <= len(body) // fetch_http._FLUSH + 1
    assert all(len(p) >= fetch_http._FLUSH for p in pieces[:-1])


def test_small_body_is_one_piece(world: World) -> None:
    name = max(
        (k for k, v in world.files["app:v1"].items() if len(v) < fetch_http._FLUSH),
        key=lambda k: len(world.files["app:v1"][k]),
    )
    body = world.files["app:v1"][name]
    h = digest_bytes(body).hex()
    pieces: list[bytes] = []
    src = source(world.url())
    try:
        src.get(f"objects/{h[:2]}/{h[2:]}", pieces.append)
    finally:
        src.close()
    assert pieces == [body]


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault("drop", after=1_500_000), SourceTransient),
        (Fault("stall", after=1_500_000, seconds=30), SourceTimeout),
    ],
)
def test_partial_body_passed_on_before_the_error(
    world: World, fault: Fault, error: type[Exception]
) -> None:
    rel, body = big(world)
    with FaultProxy(world.port).running() as proxy:
        proxy.add(fault)
        pieces: list[bytes] = []
        src = source(f"http://127.0.0.1:{proxy.port}/", read=1)
        try:
            with pytest.raises(error):
                src.get(rel, pieces.append)
        finally:
            src.close()
    got = b"".join(pieces)
    assert len(got) == 1_500_000
    assert got == body[: len(got)]


def test_error_of_the_sink_wins_and_stops_the_transfer(world: World) -> None:
    rel, _ = big(world)
    calls: list[int] = []

    class Full(Exception):
        pass

    def on_data(chunk: bytes) -> None:
        calls.append(len(chunk))
        raise Full("disk full")

    src = source(world.url())
    try:
        with pytest.raises(Full):
            src.get(rel, on_data)
    finally:
        src.close()
    assert len(calls) == 1  # not called again after it failed


def test_size_limit_still_enforced_while_buffering(world: World) -> None:
    rel, body = big(world)
    pieces: list[bytes] = []
    src = source(world.url())
    try:
        with pytest.raises(SourceBadResponse, match="limit"):
            src.get(rel, pieces.append, max_size=len(body) - 1)
    finally:
        src.close()
    assert sum(map(len, pieces)) < len(body)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, SourceTransient),
        (404, SourceNotFound),
        (403, SourceDenied),
        (203, SourceBadResponse),
    ],
)
def test_error_answers_are_classified_by_status(
    world: World, status: int, error: type[Exception]
) -> None:
    # No header callback: libcurl stops at an error status (FAILONERROR) and the status is read
    # afterwards. An error page never reaches the sink; a non-200 success is refused after.
    rel, _ = big(world)
    with FaultProxy(world.port).running() as proxy:
        proxy.add(Fault("status", status=status))
        pieces: list[bytes] = []
        src = source(f"http://127.0.0.1:{proxy.port}/")
        try:
            with pytest.raises(error, match=str(status)):
                src.get(rel, pieces.append)
        finally:
            src.close()
    if status >= 400:
        assert pieces == []
