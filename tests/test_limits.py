"""The open-files limit: every command, fetch worker and data plane raises its soft limit to the
hard one (claims, workers and the data plane hold many files open)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import resource, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    if sys.argv[1] == "function":
        from csi.limits import raise_open_files_limit
        got = raise_open_files_limit()
    else:  # the command line: a command that does nothing else of note
        from csi.cli.main import main
        main(["gc", "--dry-run", "--store", sys.argv[2]])
        got = None
    print(got, *resource.getrlimit(resource.RLIMIT_NOFILE))
    """
)


def _probe(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[-3:]


def test_the_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    got, soft, hard = _probe("function")
    assert soft == hard and got == soft
    _, soft, hard = _probe("cli", str(tmp_path / "store"))
    assert soft == hard


def test_a_fetch_worker_keeps_few_enough_files_open_for_select() -> None:
    # A worker keeps the files it writes open until they are named, but never so many that a
    # connection it opens meanwhile gets a descriptor pycurl's select cannot watch (1024+).
    code = textwrap.dedent(
        """
        import resource
        from csi.fetch import workertemp
        workertemp.limits_setup()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        print(workertemp.fds.per_chunk, soft)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    per_chunk, soft = int(out[0]), int(out[1])
    assert 0 < per_chunk <= 640 and per_chunk <= soft - 512
