"""``python -m tests.e2e`` (``make e2e``): build the image, run the chart's node pods with podman
on a stand-in node, play kubelet, run every scenario, print a summary and the total time.

Needs root, podman, runc, mmdebstrap, nginx and chart-render (``scripts/setup.sh --e2e``
installs the packages). Exit status 0 only when every scenario passed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

from .baseimage import base_image
from .build import build_image, prune_old_tags
from .harness import STATE_DIR, Harness, Images, cleanup_stale, log
from .podman import Podman, containers_conf
from .scenarios import SCENARIOS

UPGRADE_VERSION = "0.1.0-e2e-upgrade"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.e2e", description=__doc__)
    p.add_argument("--keep", action="store_true", help="keep the run's directory afterwards")
    p.add_argument("--chart", type=Path, help="render this chart directory instead")
    p.add_argument(
        "--stop-after", metavar="SCENARIO", help="stop after the scenario of this name (prefix)"
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("e2e: needs root (podman as root, mounts)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    t_start = time.monotonic()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    podman = Podman(containers_conf(STATE_DIR))
    cleanup_stale(podman)

    log("== images")
    t = time.monotonic()
    base = base_image(podman, STATE_DIR / "base-image.log")
    t_base = time.monotonic() - t
    log(f"base image {base} ({t_base:.1f} s)")
    work = STATE_DIR / "build"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    current, t_build = build_image(podman, base, work)
    log(f"built {current} ({t_build:.1f} s)")
    upgrade, t_upgrade = build_image(podman, base, work, version=UPGRADE_VERSION)
    log(f"built {upgrade} for the upgrade ({t_upgrade:.1f} s)")
    if upgrade == current:
        raise SystemExit(f"e2e: the upgrade image is the same image as {current}")
    prune_old_tags(podman, {current, upgrade})
    images = Images(base, current, upgrade)

    results: list[tuple[str, bool, float, dict[str, str], str]] = []
    h = Harness(podman, images, args.chart)
    log(f"== run {h.run_id} in {h.dir}")
    try:
        t = time.monotonic()
        h.make_repository()
        h.render(images.current)
        h.make_node()
        log(f"repository at {h.url}, node root {h.node.root} ({time.monotonic() - t:.1f} s)")  # type: ignore[union-attr]
        installed = True
        for name, fn in SCENARIOS:
            if not installed:
                results.append((name, False, 0.0, {}, "not run: install failed"))
                continue
            log(f"== {name}: {(fn.__doc__ or '').strip().splitlines()[0]}")
            t = time.monotonic()
            try:
                figures = fn(h)
            except Exception as e:
                took = time.monotonic() - t
                lines = str(e).strip().splitlines() or [""]
                detail = f"{type(e).__name__}: {lines[0]}"
                if len(lines) > 1:
                    detail += f" ... {lines[-1].strip()}"
                log(f"FAIL {name} ({took:.1f} s): {type(e).__name__}: {e}")
                log(traceback.format_exc(limit=-3).rstrip())
                results.append((name, False, took, {}, detail))
                if name == "install":
                    installed = False
                continue
            took = time.monotonic() - t
            results.append((name, True, took, figures, ""))
            log(f"PASS {name} ({took:.1f} s)")
            for k, v in figures.items():
                log(f"     {k}: {v}")
            if args.stop_after and name.startswith(args.stop_after):
                break
    except KeyboardInterrupt:
        log("interrupted")
        results.append(("(interrupted)", False, 0.0, {}, "interrupted"))
    finally:
        log("== tear-down")
        try:
            h.teardown(keep=args.keep)
        except Exception as e:
            log(f"tear-down: {type(e).__name__}: {e}")
            results.append(("tear-down", False, 0.0, {}, str(e)))

    total = time.monotonic() - t_start
    log("\n== summary")
    for name, ok, took, _, detail in results:
        log(f"{'PASS' if ok else 'FAIL'}  {name:<32} {took:6.1f} s  {detail[:160]}")
    for k, v in h.figures.items():
        log(f"note: {k}: {v}")
    for k, (secs, met) in h.bars.items():
        log(
            f"bar: {k}: HostToContainer pods read again after {secs:.1f} s "
            f"(<= 10 s: {'met' if met else 'MISSED'}), no kubelet call"
        )
    for k, n in h.covered.items():
        log(
            f"bar: after {k}: no dead mount visible on the node; {n} dead mounts stay "
            "mounted beneath the repaired targets (until unpublish)"
        )
    log(f"images: base {t_base:.1f} s, build {t_build:.1f} s, upgrade build {t_upgrade:.1f} s")
    log(f"logs: {STATE_DIR / f'logs-{h.run_id}'}")
    log(f"total time: {total:.1f} s")
    passed = sum(1 for r in results if r[1])
    failed = len(results) - passed
    log(f"e2e: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
