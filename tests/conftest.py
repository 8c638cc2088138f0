"""Test-suite settings shared by every module.

Hypothesis profiles: ``dev`` (the default) searches randomly, as property tests should on a
developer's machine; ``ci`` (``HYPOTHESIS_PROFILE=ci``, set by ``.ci/run``) is derandomized and
keeps no example database, so a CI run is reproducible: the same examples every time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

settings.register_profile("dev")
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _no_pointer_memory() -> Iterator[None]:
    """Each test starts with no memory of repositories without ref pointers (a module-level
    memo in csi/fetch/pointers.py, keyed by URL: a port reused by a later test's server would
    otherwise carry it over)."""
    from csi.fetch import pointers

    pointers._no_pointers.clear()
    yield
