"""Test-suite settings shared by every module.

Hypothesis profiles: ``dev`` (the default) searches randomly, as property tests should on a
developer's machine; ``ci`` (``HYPOTHESIS_PROFILE=ci``, set by ``.ci/run``) is derandomized and
keeps no example database, so a CI run is reproducible: the same examples every time.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("dev")
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
