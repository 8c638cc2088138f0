"""Process limits shared by the layers that hold many files open."""

from __future__ import annotations

import contextlib
import resource


def raise_open_files_limit() -> int:
    """Lift the soft open-files limit to the hard one and return the soft limit now in force.

    The store's claims hold a descriptor per lock file touched (up to 64 per chunk of a bulk
    fetch, for each of its chunk threads), fetch workers keep the files they write open until
    they are named, and the data plane keeps objects open: a soft limit of 1024, still the
    default in some container runtimes, is too low for those, and the hard limit is there to
    be used (Go programs raise it the same way at start)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft
