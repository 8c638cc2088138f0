"""The mirrors of one repository, and the retry loop every request to them goes through.

:meth:`Mirrors.attempts` runs one attempt function against the mirrors in order:
permanent failures (404, 401/403, bad answers) drop that mirror for that subject, transient
ones (connection errors, timeouts, 5xx, 429, 408, digest mismatches) are retried with
exponential backoff and jitter, honouring Retry-After. When every attempt failed, the worst
failure becomes the public :class:`~csi.fetch.errors.FetchError`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from . import metrics as m
from .config import RepositoryConfig
from .errors import (
    FetchError,
    SourceCorrupt,
    SourceDenied,
    SourceError,
    SourceInvalid,
    SourceNotFound,
    SourceTimeout,
    SourceTransient,
)
from .quoting import redact
from .source import Source
from .sources import make_source

log = logging.getLogger(__name__)

T = TypeVar("T")

_RANK: dict[type[SourceError], int] = {
    SourceCorrupt: 6,
    SourceInvalid: 5,
    SourceDenied: 4,
    SourceTimeout: 2,
    SourceTransient: 2,
    SourceNotFound: 1,
}


def retry_reason(e: SourceError) -> str:
    """The ``reason`` label of the retry an error causes."""
    if isinstance(e, SourceCorrupt):
        return "corrupt"
    if isinstance(e, SourceTimeout):
        return "timeout"
    msg = str(e)
    if msg.startswith("HTTP 429"):
        return "http_429"
    if msg.startswith("HTTP 408"):
        return "http_408"
    if msg.startswith("HTTP 5"):
        return "http_5xx"
    return "connection"


class Mirrors:
    """The configured mirrors of one repository (one :class:`Source` each)."""

    def __init__(
        self,
        config: RepositoryConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.name = config.name
        self.sources: list[Source] = [make_source(u, config) for u in config.urls]
        self._sleep = sleep
        self._rng = rng

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def backoff(self, attempt: int, hint: float | None) -> float:
        p = self.config.retries
        if hint is not None:
            return min(hint, p.max_retry_after)
        delay = min(p.max_backoff, p.base_backoff * (2**attempt))
        return float(delay - delay * p.jitter * self._rng())

    def attempts(
        self, subject: str, attempt: Callable[[Source], T], prior: SourceError | None = None
    ) -> T:
        """Run ``attempt`` against mirrors with retries until one succeeds (see module doc).

        ``prior``: how a first attempt against the first mirror, already made elsewhere (a
        bulk worker's batch of requests), failed; it counts as that attempt.
        """
        if prior is not None:
            run = attempt
            first: list[SourceError] = [prior]

            def attempt(src: Source) -> T:
                if first:
                    raise first.pop()
                return run(src)

        policy = self.config.retries
        dropped: set[int] = set()
        last: dict[int, SourceError] = {}
        prev_reason: str | None = None
        for round_no in range(policy.max_attempts):
            hint: float | None = None
            for i, src in enumerate(self.sources):
                if i in dropped:
                    continue
                if prev_reason is not None:
                    m.RETRIES.labels(self.name, prev_reason).inc()
                try:
                    return attempt(src)
                except SourceError as e:
                    last[i] = e
                    if not e.transient:
                        dropped.add(i)
                        prev_reason = None
                        log.warning(
                            "repository %r: %s: %s: %s",
                            self.name,
                            subject,
                            src.label,
                            self.safe(e),
                        )
                        continue
                    prev_reason = retry_reason(e)
                    if e.retry_after is not None:
                        hint = max(hint or 0.0, e.retry_after)
                    log.warning(
                        "repository %r: %s: %s: %s (attempt %d of %d)",
                        self.name,
                        subject,
                        src.label,
                        self.safe(e),
                        round_no + 1,
                        policy.max_attempts,
                    )
            if len(dropped) == len(self.sources) or round_no + 1 == policy.max_attempts:
                break
            self._sleep(self.backoff(round_no, hint))
        raise self.public_error(subject, last)

    def public_error(self, subject: str, last: dict[int, SourceError]) -> FetchError:
        worst = max(last.values(), key=lambda e: _RANK.get(type(e), 3))
        if len(self.sources) == 1:
            detail = f"{self.sources[0].label}: {self.safe(worst)}"
        else:
            detail = "; ".join(
                f"{self.sources[i].label}: {self.safe(e)}" for i, e in sorted(last.items())
            )
        return worst.public(detail, repository=self.name, subject=subject)

    def safe(self, e: BaseException) -> str:
        """The text of ``e`` without this repository's credentials (a hostile server may
        echo them back in anything it sends)."""
        return redact(str(e), self.config.secrets())
