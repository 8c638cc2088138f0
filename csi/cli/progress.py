"""Progress bars for long CLI operations (tqdm on a terminal, silent otherwise)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from tqdm import tqdm


class Bar:
    """A byte-counting progress bar that is a no-op when stderr is not a terminal.

    ``update_to(done, total)`` may be called from any thread.
    """

    def __init__(self, desc: str, *, unit: str = "B", enabled: bool | None = None) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar: Any = (
            tqdm(
                desc=desc,
                unit=unit,
                unit_scale=True,
                unit_divisor=1024 if unit == "B" else 1000,
                dynamic_ncols=True,
                leave=False,
                file=sys.stderr,
            )
            if enabled
            else None
        )

    def update_to(self, done: int, total: int | None = None) -> None:
        bar = self._bar
        if bar is None:
            return
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    def set_postfix(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


ProgressFn = Callable[[int, int], None]
