"""Run every benchmark in turn: ``python -m bench.run [--quick]`` (``make bench``).

Each benchmark prints its own table and ratios against a baseline measured in the same run; the
figures recorded in docs/benchmarks.md come from the full runs (no ``--quick``). Run on a quiet
machine: the ratios are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

#: (module, takes --quick) in the order of the data path: build, fetch, store, serve, publish.
BENCHMARKS = [
    ("bench.build", True),
    ("bench.fetch", True),
    ("bench.store", False),
    ("bench.fuse", True),
    ("bench.publish", True),
    ("bench.oci_import", True),
    ("bench.network", True),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, smoke-test speed")
    parser.add_argument("only", nargs="*", help="run only these (e.g. build fuse)")
    args = parser.parse_args()
    failed = []
    for module, has_quick in BENCHMARKS:
        if args.only and module.split(".")[1] not in args.only:
            continue
        cmd = [sys.executable, "-m", module] + (["--quick"] if args.quick and has_quick else [])
        print(f"\n### {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(module)
    if failed:
        print(f"\nbenchmarks below their bar or failing: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
