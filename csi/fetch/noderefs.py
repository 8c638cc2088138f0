"""Refs as this node knows them: asked for conditionally, kept through an outage.

A node's store records what each ref resolved to, when a repository last confirmed it, and the
validators (``ETag``, ``Last-Modified``) of that answer (:meth:`csi.store.Store.ref_record`).
:func:`resolve` uses the record twice:

- the request is conditional (:mod:`csi.fetch.resolving`): an unchanged ref costs a 304;
- before that, a node holding images tries the ref's pointer (:mod:`csi.fetch.pointers`): an
  image it holds, or one made from a delta against an image it holds, costs a few small
  requests instead of the whole image;
- when every mirror is unreachable (:class:`~csi.fetch.errors.Unreachable`, timeouts included;
  not a 404 or a refusal, which are answers), the recorded digest is used, like
  ``imagePullPolicy: IfNotPresent``, if the repository allows it (``offline_refs``) and a
  mirror confirmed it at most ``offline_max_staleness`` seconds ago: a warning is logged and
  ``composefs_csi_fetch_ref_resolutions_total{result="offline"}`` counts it.

:func:`record` notes a resolution once the fetch that needed it is done.
"""

from __future__ import annotations

import logging
import time

from csi.store import RefRecord, Store

from . import metrics as m
from .errors import Unreachable
from .mirrors import Mirrors
from .pointers import resolve_with_delta
from .progress import FetchProgress
from .refs import parse_digest
from .resolving import Known, Resolved, resolve_ref
from .source import Validators

log = logging.getLogger(__name__)


def _known(rec: RefRecord | None) -> Known | None:
    if rec is None or rec.source is None or not (rec.etag or rec.last_modified):
        return None
    return Known(rec.digest, Validators(rec.etag, rec.last_modified), rec.source)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def resolve(
    mirrors: Mirrors, ref: str, store: Store | None, progress: FetchProgress | None
) -> Resolved:
    """Resolve ``ref`` as :func:`~csi.fetch.resolving.resolve_ref` does, with what ``store``
    recorded of it (see the module doc). A digest reference needs neither."""
    if store is None or parse_digest(ref) is not None:
        return resolve_ref(mirrors, ref, progress)
    name = mirrors.name
    rec = store.ref_record(name, ref)
    known = _known(rec)
    try:
        res = resolve_with_delta(mirrors, ref, store, known, progress)
        how = "pointer"
        if res is None:
            res = resolve_ref(mirrors, ref, progress, known)
            how = "answered"
    except Unreachable as e:
        if rec is None:
            raise
        return _offline(mirrors, ref, rec, e)
    m.REF_RESOLUTIONS.labels(name, "not_modified" if res.unchanged else how).inc()
    return res


def _offline(mirrors: Mirrors, ref: str, rec: RefRecord, error: Unreachable) -> Resolved:
    config = mirrors.config
    age = max(0.0, time.time() - rec.checked)
    limit = config.offline_max_staleness
    if not config.offline_refs:
        error.args = (f"{error}; offline_refs is off for this repository",)
        raise error
    if limit is not None and age > limit:
        error.args = (
            f"{error}; this node's resolution of the ref was last confirmed {_age(age)} ago, "
            f"longer than offline_max_staleness ({_age(limit)})",
        )
        raise error
    log.warning(
        "repository %r unreachable: ref %r resolved to sha256:%s, as a mirror last confirmed "
        "%s ago (%s)",
        mirrors.name,
        ref,
        rec.digest.hex(),
        _age(age),
        error,
    )
    m.REF_RESOLUTIONS.labels(mirrors.name, "offline").inc()
    return Resolved(rec.digest, offline=True)


def record(name: str, store: Store, ref: str, res: Resolved) -> None:
    """Note in ``store`` what ``ref`` resolved to (nothing for a digest, or offline)."""
    if res.offline or parse_digest(ref) is not None:
        return
    if res.unchanged and store.confirm_ref(name, ref, res.digest):
        return
    v = res.validators or Validators()
    store.set_ref(
        name, ref, res.digest, etag=v.etag, last_modified=v.last_modified, source=res.source
    )
