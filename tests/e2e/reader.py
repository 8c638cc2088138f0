"""What the harness's "pod" containers run: read every file of a volume over and over, and
check it against the manifest of what was published.

Standalone (standard library only): the fake kubelet mounts this file and the manifest into the
pod through a ConfigMap volume. Each pass opens every file anew (so a pass that succeeds after a
data-plane restart shows that new opens work again), asks for a statfs (which only a live data
plane answers: the kernel serves cached files without it), compares sizes and SHA-256 digests,
checks symlink targets and that whiteouted names are absent, and appends one JSON line to
``--out``::

    {"n": 7, "t0": <epoch>, "t1": <epoch>, "ok": 41, "failed": 0, "errors": []}

``errors`` holds the first few failures (``path: ENOTCONN`` and the like).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import signal
import sys
import time


def check(root: str, manifest: dict[str, dict[str, object]]) -> tuple[int, list[str]]:
    ok = 0
    errors: list[str] = []
    # The kernel answers reads and listings of files it has cached even when the data plane is
    # gone (no open requests, no expiring attributes); a statfs always reaches the data plane,
    # so a pass succeeds only while the volume is really served.
    try:
        os.statvfs(root)
    except OSError as e:
        errors.append(f"statfs: {errno.errorcode.get(e.errno or 0, str(e.errno))}")
    for rel, want in manifest.items():
        path = os.path.join(root, rel)
        try:
            kind = want["type"]
            if kind == "file":
                h = hashlib.sha256()
                size = 0
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                        size += len(chunk)
                if size != want["size"] or h.hexdigest() != want["sha256"]:
                    errors.append(f"{rel}: content differs ({size} bytes)")
                    continue
            elif kind == "symlink":
                if os.readlink(path) != want["target"]:
                    errors.append(f"{rel}: symlink target differs")
                    continue
            elif kind == "absent" and os.path.lexists(path):
                errors.append(f"{rel}: present, should be hidden")
                continue
            ok += 1
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            errors.append(f"{rel}: {name}")
    return ok, errors


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.2)
    args = p.parse_args()
    # As PID 1 of its container, the default SIGTERM action would be ignored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open(args.manifest) as f:
        manifest = json.load(f)
    n = 0
    with open(args.out, "a", buffering=1) as out:
        while True:
            t0 = time.time()
            ok, errors = check(args.root, manifest)
            line = {"n": n, "t0": t0, "t1": time.time(), "ok": ok, "failed": len(errors)}
            line["errors"] = errors[:3]
            out.write(json.dumps(line) + "\n")
            n += 1
            time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
