"""Regenerate tests/data/writer_golden.json with the reference mkcomposefs.

Needs COMPOSEFS_UPSTREAM pointing at a composefs 1.0.8 build tree (tools in build/tools).
Each tree of tests/writer_trees.py is written as a dump by our dump formatter, fed to
``mkcomposefs --from-file`` for both minimum versions, and the image's sha256 recorded.
Run: ``COMPOSEFS_UPSTREAM=... .venv/bin/python -m tests.tools.gen_writer_golden``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from csi.image.dump import format_dump
from tests.writer_trees import TREES

OUT = Path(__file__).resolve().parent.parent / "data" / "writer_golden.json"


def main() -> int:
    upstream = os.environ.get("COMPOSEFS_UPSTREAM")
    if not upstream:
        print("set COMPOSEFS_UPSTREAM to a composefs 1.0.8 source+build tree", file=sys.stderr)
        return 2
    mk = Path(upstream) / "build" / "tools" / "mkcomposefs"
    golden: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dump, img = Path(tmp) / "t.dump", Path(tmp) / "t.img"
        for name, build in TREES.items():
            dump.write_bytes(format_dump(build(), exact=True))
            golden[name] = {}
            for v in (0, 1):
                subprocess.run(
                    [mk, f"--min-version={v}", "--max-version=1", "--from-file", dump, img],
                    check=True,
                )
                golden[name][f"v{v}"] = hashlib.sha256(img.read_bytes()).hexdigest()
    OUT.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({len(golden)} trees)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
