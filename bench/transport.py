"""Transport candidates for fetching many objects over a round trip (issue 14), measured alone.

    python -m bench.transport --workdir DIR [--tree 10k] [--rtts 20,80] [--parallel 16,64,256]

Uses the trees and repositories ``bench.network --workdir DIR`` built (run it first). Every
candidate downloads the same bytes with pycurl (the driver's HTTP library) through the latency
proxy and throws them away (no hashing, no store): what each way of asking costs by itself.

- ``h1 objects``: one GET per object, N transfers at a time over N HTTP/1.1 connections;
- ``h2 objects``: one GET per object, N streams at a time multiplexed over HTTP/2 (h2c with
  prior knowledge; nginx ``listen ... http2``) connections;
- ``h1 ranges``: the image's pack, in the 4 MiB ranges the driver plans, 16 at a time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pycurl

from csi.fetch.packs import plan
from csi.image.reader import Image
from csi.repo import Repository
from csi.repo.packs import index_relpath, parse_index
from tests.nginx import Nginx
from tests.support.latency import LatencyProxy


def _discard(_data: bytes) -> None:
    return None


def run_multi(base: str, jobs: list[tuple[str, str | None]], parallel: int, h2: bool) -> float:
    """Download ``jobs`` (path, range or None), ``parallel`` at a time; seconds."""
    multi = pycurl.CurlMulti()
    if h2:
        multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, max(1, parallel // 100))
    free: list[pycurl.Curl] = []
    active: dict[pycurl.Curl, str] = {}
    it = iter(jobs)
    more = True
    t0 = time.perf_counter()
    while more or active:
        while more and len(active) < parallel:
            try:
                path, rng = next(it)
            except StopIteration:
                more = False
                break
            c = free.pop() if free else pycurl.Curl()
            c.setopt(pycurl.URL, base + path)
            c.setopt(pycurl.WRITEFUNCTION, _discard)
            c.setopt(pycurl.FAILONERROR, 1)
            c.setopt(
                pycurl.HTTP_VERSION,
                pycurl.CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE if h2 else pycurl.CURL_HTTP_VERSION_1_1,
            )
            if h2:
                c.setopt(pycurl.PIPEWAIT, 1)
            if rng is not None:
                c.setopt(pycurl.RANGE, rng)
            else:
                c.unsetopt(pycurl.RANGE)
            multi.add_handle(c)
            active[c] = path
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        while True:
            queued, ok, failed = multi.info_read()
            for c in ok:
                multi.remove_handle(c)
                del active[c]
                free.append(c)
            for c, code, msg in failed:
                raise RuntimeError(f"{active[c]}: {code} {msg}")
            if not queued:
                break
        if active:
            multi.select(0.1)
    dt = time.perf_counter() - t0
    for c in free:
        c.close()
    multi.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--tree", default="10k")
    ap.add_argument("--rtts", default="20,80")
    ap.add_argument("--parallel", default="16,64,256")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = args.workdir
    repo = Repository(work / args.tree / "repo-pack")
    image = repo.resolve_ref("t/v1")
    with Image.open(repo.image_path(image)) as img:
        sizes = img.object_sizes()
    objects = [(f"{args.tree}/repo-pack/objects/{d.hex()[:2]}/{d.hex()[2:]}", None) for d in sizes]
    idx = parse_index(repo.root.joinpath(index_relpath(image)).read_bytes(), max_entries=len(sizes))
    ranges_, _ = plan(idx, sizes)
    ranges: list[tuple[str, str | None]] = [
        (f"{args.tree}/repo-pack/{r.relpath}", f"{r.offset}-{r.offset + r.length - 1}")
        for r in ranges_
    ]
    total = sum(sizes.values())
    servers = [
        f"server {{ listen 127.0.0.1:{{port}}; root {work}; location / {{ }} }}",
        "server { listen 127.0.0.1:{h2} http2; http2_max_concurrent_streams 256; "
        f"root {work}; location / {{ }} }}",
    ]
    print(f"{len(objects)} objects, {total / 1e6:.0f} MB; {len(ranges)} ranges", flush=True)
    with Nginx(work / "nginx-transport", servers, ports=("port", "h2"), access_log=False) as ng:
        for rtt in (int(x) for x in args.rtts.split(",")):
            rows: list[tuple[str, float]] = []
            cases: list[tuple[str, int, list[tuple[str, str | None]], bool]] = []
            for n in (int(x) for x in args.parallel.split(",")):
                cases += [(f"h1 objects x{n}", n, objects, False)]
                cases += [(f"h2 objects x{n}", n, objects, True)]
            cases.append(("h1 ranges x16", 16, ranges, False))
            for label, n, jobs, h2 in cases:
                port = ng.ports["h2"] if h2 else ng.port
                times = []
                for _ in range(args.runs):
                    with LatencyProxy(port, rtt / 1000) as proxy:
                        times.append(run_multi(f"http://127.0.0.1:{proxy.port}/", jobs, n, h2))
                rows.append((label, statistics.median(times)))
                runs = " ".join(f"{t:.2f}" for t in times)
                print(
                    f"rtt {rtt} ms  {label:18} {rows[-1][1]:6.2f} s "
                    f"({total / rows[-1][1] / 1e6:.0f} MB/s) [{runs}]",
                    flush=True,
                )


if __name__ == "__main__":
    main()
