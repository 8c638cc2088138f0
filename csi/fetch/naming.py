"""What a fetch worker hands back for each object, and the step that makes it final: the
written temp files made durable and named in the store's ``objects/``.

A worker (:mod:`csi.fetch.worker`) writes and verifies each object into a temp file of the
store (:class:`Written`), or fails it (:class:`Failed`). Then, still in the worker and under
the objects' locks across processes (which the worker holds) and the parent's claim among its
threads (:meth:`csi.store.Store.claim_in_process`), :func:`name_written` flushes the
filesystem once, checks each file's writeback error, enables fs-verity where the filesystem
has it and renames each file into place (:class:`Named`); the parent only records the rows
(:meth:`csi.store.Store.record_named`). Durable, then named, then recorded: an object named
but not recorded when a process dies is whole, and the store's recovery records it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from csi.repo import layout
from csi.repo.batch import make_durable
from csi.repo.tmpfiles import TempFile
from csi.repo.verity import UNSUPPORTED_ERRNOS, enable_verity
from csi.store.writer import NO_SPACE_ERRNOS

from . import errors


class Written(NamedTuple):
    """An object a worker wrote and verified: ``path`` holds exactly its ``size`` bytes.
    ``fd``: the descriptor that wrote it, still open (-1: closed), for :func:`name_written`."""

    digest: bytes
    path: str
    size: int
    received: int
    fd: int = -1


class Named(NamedTuple):
    """An object a worker wrote, verified, made durable and named in the store: ``new`` if
    this worker named it, False if it was there already. (A named tuple: thousands cross
    from the workers per fetch, and tuples pickle fastest.)"""

    digest: bytes
    size: int
    received: int
    new: bool
    verity: bool


#: :attr:`Failed.error` of an object another process was writing (its lock was held): the
#: parent waits for it in-process (:meth:`csi.store.Store.ensure`).
CLAIMED = "claimed"


@dataclass(frozen=True, slots=True)
class Failed:
    """An object a worker could not fetch: ``error`` names a :mod:`csi.fetch.errors` class,
    or is ``"no_space"`` (retry in-process, where the store can make room) or
    :data:`CLAIMED`."""

    digest: bytes
    error: str
    message: str
    subject: str | None
    received: int

    def to_exception(self) -> errors.FetchError:
        cls = getattr(errors, self.error, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.FetchError)):
            cls = errors.FetchError
        e = cls(self.message)  # the message already names the repository and subject
        e.subject = self.subject
        return e


#: Whether this worker's filesystem enables fs-verity (None: not known yet).
_verity: bool | None = None


def verity_known() -> bool | None:
    """Whether this process found that the store's filesystem enables fs-verity (None: it
    has not tried yet)."""
    return _verity


def name_written(
    results: list[Written | Failed], tmpdir: str, repo_root: str, fsync: bool, verity: bool
) -> list[Named | Failed]:
    """Make the written files durable (one ``syncfs`` for all, then each file's writeback
    error), enable fs-verity where the filesystem has it, and rename each into
    ``repo_root``'s ``objects/`` unless the object is there already; as the store names the
    objects it writes itself (:meth:`csi.store.Store.ensure`). A file that fails is removed
    and reported (``no_space`` for a full disk: the parent fetches it again in-process)."""
    global _verity
    done: dict[int, Named | Failed] = {}  # for each Written, by its index in ``results``
    todo: list[tuple[int, Written, TempFile]] = []
    for i, r in enumerate(results):
        if not isinstance(r, Written):
            continue
        if r.fd >= 0:  # the descriptor that wrote it: its writeback errors reach it too
            todo.append((i, r, TempFile(r.path, -1, r.fd)))
            continue
        try:
            fd = os.open(r.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(r.path)
            done[i] = _failed_naming(r, e)
            continue
        todo.append((i, r, TempFile(r.path, -1, fd)))
    try:
        temps = [t for _, _, t in todo]
        durable = make_durable(Path(tmpdir), temps) if fsync else [None] * len(temps)
        for (i, r, tmp), err in zip(todo, durable, strict=True):
            if err is not None:
                tmp.discard()
                done[i] = _failed_naming(r, err)
                continue
            enabled = False
            if verity and _verity is not False:
                code = enable_verity(tmp.lock_fd)
                enabled = code == 0
                if enabled:
                    _verity = True
                elif code in UNSUPPORTED_ERRNOS and _verity is None:
                    _verity = False
            try:
                new = tmp.publish(f"{repo_root}/{layout.object_relpath(r.digest)}")
            except OSError as e:
                tmp.discard()
                done[i] = _failed_naming(r, e)
                continue
            done[i] = Named(r.digest, r.size, r.received, new, enabled and new)
    finally:
        for i, _, tmp in todo:  # an unexpected error above: nothing half-named stays behind
            if i not in done:
                tmp.discard()
    return [r if isinstance(r, Failed) else done[i] for i, r in enumerate(results)]


def _failed_naming(r: Written, e: OSError) -> Failed:
    subject = f"object {r.digest.hex()}"
    if e.errno in NO_SPACE_ERRNOS:
        return Failed(r.digest, "no_space", f"storing {subject}: {e}", subject, r.received)
    message = (
        f"storing {subject} in the node's store failed: {e}; the object was downloaded and"
        " verified, so the store's disk is the problem: check it (dmesg, `composefs-csi fsck`)"
    )
    return Failed(r.digest, "FetchError", message, subject, r.received)
