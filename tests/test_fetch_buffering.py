"""HttpSource passes a body on in a few large pieces (not one per 16 KiB libcurl chunk), and
still passes on exactly what arrived when a transfer fails half-way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
from tests.fetchkit import Fault, FaultProxy, World, object_rel, serve_world

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


# -- several requests at once (HttpSource.get_many, used by bulk worker processes) ------------


def objects_of(world: World) -> list[tuple[str, bytes]]:
    return [(object_rel(digest_bytes(b)), b) for b in world.files["app:v1"].values()]


def run_many(
    src: HttpSource, jobs: list[str], parallel: int, fail_begin: str | None = None
) -> tuple[dict[str, object], dict[str, bytearray]]:
    bodies: dict[str, bytearray] = {}

    def begin(rel: str) -> fetch_http.Request:
        if rel == fail_begin:
            raise OSError(28, "No space left on device")
        buf = bodies[rel] = bytearray()
        return fetch_http.Request(rel, buf.extend)

    outcomes = dict(src.get_many(jobs, begin, parallel=parallel))
    return outcomes, bodies


def test_get_many_returns_every_body(world: World) -> None:
    objs = objects_of(world)
    src = source(world.url())
    try:
        for parallel in (1, 3, 16):
            outcomes, bodies = run_many(src, [rel for rel, _ in objs], parallel)
            assert set(outcomes) == {rel for rel, _ in objs}
            for rel, body in objs:
                resp = outcomes[rel]
                assert isinstance(resp, fetch_http.Response) and resp.size == len(body)
                assert bytes(bodies[rel]) == body
    finally:
        src.close()


def test_get_many_failures_stay_with_their_request(world: World) -> None:
    # One request answered 404, one cut mid-body, one stalled past the read timeout, one whose
    # begin() fails: each gets its own error, the others their bodies.
    objs = sorted(objects_of(world), key=lambda o: -len(o[1]))
    (big_rel, big_body), (cut_rel, cut_body), (stall_rel, _), (nospace_rel, _) = objs[:4]
    missing = "objects/00/" + "0" * 62
    with FaultProxy(world.port).running() as proxy:
        proxy.add(Fault("drop", match=cut_rel, after=len(cut_body) // 2))
        proxy.add(Fault("stall", match=stall_rel, after=10, seconds=30))
        src = source(f"http://127.0.0.1:{proxy.port}/", read=1)
        try:
            jobs = [rel for rel, _ in objs] + [missing]
            outcomes, bodies = run_many(src, jobs, 4, fail_begin=nospace_rel)
        finally:
            src.close()
    assert isinstance(outcomes[missing], SourceNotFound)
    assert isinstance(outcomes[cut_rel], SourceTransient)
    assert bytes(bodies[cut_rel]) == cut_body[: len(bodies[cut_rel])] != cut_body
    assert isinstance(outcomes[stall_rel], SourceTimeout)
    assert isinstance(outcomes[nospace_rel], OSError) and nospace_rel not in bodies
    assert bytes(bodies[big_rel]) == big_body
    for rel, body in objs[4:]:
        assert isinstance(outcomes[rel], fetch_http.Response)
        assert bytes(bodies[rel]) == body


def test_get_many_stopped_early_leaves_the_source_usable(world: World) -> None:
    objs = objects_of(world)
    src = source(world.url())
    try:
        bodies: dict[str, bytearray] = {}

        def begin(rel: str) -> fetch_http.Request:
            buf = bodies[rel] = bytearray()
            return fetch_http.Request(rel, buf.extend)

        gen = src.get_many([rel for rel, _ in objs], begin, parallel=4)
        next(gen)
        gen.close()  # requests still running are dropped
        outcomes, again = run_many(src, [rel for rel, _ in objs], 4)
        assert all(isinstance(o, fetch_http.Response) for o in outcomes.values())
        assert {rel: bytes(b) for rel, b in again.items()} == dict(objs)
        rel, body = objs[0]
        got: list[bytes] = []
        src.get(rel, got.append)
        assert b"".join(got) == body
    finally:
        src.close()


def test_two_get_many_interleaved_in_one_thread(world: World) -> None:
    # Each call has handles of its own, whatever order the two are advanced in.
    objs = objects_of(world)
    src = source(world.url())
    try:
        bodies: dict[tuple[int, str], bytearray] = {}

        def begin_for(n: int) -> Callable[[str], fetch_http.Request]:
            def begin(rel: str) -> fetch_http.Request:
                buf = bodies[(n, rel)] = bytearray()
                return fetch_http.Request(rel, buf.extend)

            return begin

        jobs = [rel for rel, _ in objs]
        for _ in src.get_many(jobs, begin_for(0), parallel=3):  # leaves spare handles
            pass
        a = src.get_many(jobs, begin_for(1), parallel=3)
        b = src.get_many(jobs, begin_for(2), parallel=3)
        outcomes: list[object] = []
        for x, y in zip(a, b, strict=True):
            outcomes += [x[1], y[1]]
        assert all(isinstance(o, fetch_http.Response) for o in outcomes)
        for n in (1, 2):
            assert {rel: bytes(bodies[(n, rel)]) for rel in jobs} == dict(objs)
    finally:
        src.close()
