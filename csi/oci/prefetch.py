"""Reading ahead in a thread of its own: the network or disk reads, the hashing of the blob and
the decompression of a layer (all of them C code that releases the GIL on large buffers) run
while the importer's thread parses the tar and hashes and writes the files.

At most ``depth`` pieces (of at most 1 MiB each) wait between the two, so memory stays flat.
An exception in the thread is raised to the reader at the point where it happened.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

_POLL = 0.1


class Prefetcher:
    """``produce()`` (pieces, ``b""`` at the end) run ahead; call the object for the pieces.

    :meth:`close` must be called (it stops the thread and waits for it): the source the thread
    reads must not be touched by anyone else before.
    """

    def __init__(self, produce: Callable[[], bytes], depth: int = 4) -> None:
        self._produce = produce
        self._queue: queue.Queue[tuple[bytes, BaseException | None]] = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="oci-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._produce()
                self._put((data, None))
                if not data:
                    return
        except BaseException as e:  # handed to the reader
            self._put((b"", e))

    def _put(self, item: tuple[bytes, BaseException | None]) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def __call__(self) -> bytes:
        if self._done:
            return b""
        data, error = self._queue.get()
        if error is not None:
            self._done = True
            raise error
        if not data:
            self._done = True
        return data

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(_POLL)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
