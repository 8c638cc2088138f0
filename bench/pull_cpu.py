"""Where a pull's CPU goes: each process of `composefs-csi pull` (the CLI and its fetch
workers) and the whole machine, sampled from /proc while the pull runs.

A diagnostic, run by hand (not by ``make bench``): it answers "which process is the serial
part". The repository is served by nginx on loopback (no latency proxy); the store is
emptied, the page cache written back and dropped, and the machine left 370 s to settle after
deleting the last run's files (ext4 without a journal skips inodes freed less than 60 s ago,
360 s while the allocator finds their inode table block dirty, as a pull makes it: see
bench/network.py, QUIET_AFTER_DELETE).

    python -m bench.pull_cpu --repo DIR --ref NAME [--runs N]

e.g. the 100k-file repository that `python -m bench.network --workdir W` keeps in
`W/100k/repo-pack` (ref `t/v1`). Run as root (to drop caches).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.network import QUIET_AFTER_DELETE
from tests.nginx import Nginx, static_server

_TICK = os.sysconf("SC_CLK_TCK")
_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq")


def _proc_cpu(pid: int) -> tuple[float, float] | None:
    """(user, system) seconds of ``pid`` so far, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _descendants(pid: int) -> list[int]:
    out = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{t}/children").read_text().split()
        except OSError:
            continue
        for c in children:
            out += _descendants(int(c))
    return out


def _machine() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1 : 1 + len(_CPU_FIELDS)]]


def run_once(repo: Path, ref: str, store: Path) -> None:
    shutil.rmtree(store, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    time.sleep(QUIET_AFTER_DELETE)
    work = Path(tempfile.mkdtemp(prefix="pull-cpu-nginx-"))
    with Nginx(work, [static_server(repo)], access_log=False) as ng:
        subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
        cmd = [
            sys.executable,
            "-m",
            "csi.cli.main",
            "pull",
            ref,
            "--repository",
            f"http://127.0.0.1:{ng.port}/",
            "--store",
            str(store),
            "--allow-plain-http",
        ]
        before = _machine()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last: dict[int, tuple[float, float]] = {}
        while proc.poll() is None:
            for pid in _descendants(proc.pid):
                cpu = _proc_cpu(pid)
                if cpu is not None:
                    last[pid] = cpu
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        after = _machine()
    if proc.returncode != 0:
        raise SystemExit(f"the pull failed ({proc.returncode}): run it by hand to see why")
    machine = {n: (b - a) / _TICK for n, a, b in zip(_CPU_FIELDS, before, after, strict=True)}
    print(f"wall {wall:.2f} s; machine: " + ", ".join(f"{k} {v:.1f} s" for k, v in machine.items()))
    for pid, (user, system) in sorted(last.items()):
        role = "parent" if pid == proc.pid else "child "
        print(f"  {role} {pid}: {user + system:5.1f} s CPU (user {user:.1f}, system {system:.1f})")
    shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, required=True, help="repository directory to serve")
    ap.add_argument("--ref", required=True, help="ref to pull")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument(
        "--store", type=Path, default=None, help="store directory, emptied (default: beside --repo)"
    )
    args = ap.parse_args()
    store = args.store or args.repo.resolve().parent / "pull-cpu-store"
    for i in range(args.runs):
        print(f"run {i + 1}:")
        run_once(args.repo.resolve(), args.ref, store)


if __name__ == "__main__":
    main()
