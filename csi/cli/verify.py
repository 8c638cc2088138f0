"""``composefs-csi verify``: check every object and image of a repository against its name."""

from __future__ import annotations

import argparse
from pathlib import Path

from csi.cli.progress import Bar
from csi.repo import Repository


def run(args: argparse.Namespace) -> int:
    repo = Repository(Path(args.repo))
    with Bar("verifying", unit="B") as bar:
        report = repo.verify(progress=bar.update_to)
    print(report)
    return 0 if report.ok else 1
