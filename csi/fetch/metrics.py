"""Prometheus metrics of repository fetching (registered in :data:`csi.metrics.REGISTRY`).

Labels carry the repository's configured *name* only: never a URL, a host or a credential.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from csi.metrics import REGISTRY

_P = "composefs_csi_fetch_"

BYTES = Counter(
    _P + "bytes",
    "Bytes received from repositories, by outcome of the transfer (ok, corrupt, error)",
    ["repository", "result"],
    registry=REGISTRY,
)
OBJECTS = Counter(
    _P + "objects",
    "Objects and images downloaded, by result (ok, not_found, corrupt, error)",
    ["repository", "result"],
    registry=REGISTRY,
)
DEDUP_HITS = Counter(
    _P + "dedup_hits",
    "Objects an image needed that were already in the store or being fetched by another fetch",
    ["repository"],
    registry=REGISTRY,
)
DIGEST_MISMATCHES = Counter(
    _P + "digest_mismatches",
    "Downloads rejected because the bytes did not match their digest",
    ["repository"],
    registry=REGISTRY,
)
RETRIES = Counter(
    _P + "retries",
    "Attempts repeated after a transient failure, by reason "
    "(connection, timeout, http_5xx, http_429, http_408, corrupt)",
    ["repository", "reason"],
    registry=REGISTRY,
)
REF_RESOLUTIONS = Counter(
    _P + "ref_resolutions",
    "Ref names resolved, by how: answered (the repository sent the ref), not_modified (a "
    "conditional request confirmed this node's last resolution: HTTP 304), pointer (through "
    "the ref's pointer in packs/refs/: its image was on the node already or came as a delta "
    "against one that was), offline (every mirror unreachable: this node's last resolution "
    "used)",
    ["repository", "result"],
    registry=REGISTRY,
)
PACK_RANGES = Counter(
    _P + "pack_ranges",
    "Range requests to pack files, by result (ok; error: their objects then came from objects/)",
    ["repository", "result"],
    registry=REGISTRY,
)
DURATION = Histogram(
    _P + "duration_seconds",
    "Time to fetch an image and its missing objects, by result (ok or the error code)",
    ["repository", "result"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)

#: The label values the client uses (besides the repository's name).
RESULTS = ("ok", "not_found", "corrupt", "error")
RETRY_REASONS = ("connection", "timeout", "http_5xx", "http_429", "http_408", "corrupt")
REF_RESULTS = ("answered", "not_modified", "pointer", "offline")


def init_repository(name: str) -> None:
    """Give a repository's series their known label sets at zero, so dashboards show 0 for
    an idle repository rather than "No data"."""
    for result in ("ok", "corrupt", "error"):
        BYTES.labels(name, result)
    for result in RESULTS:
        OBJECTS.labels(name, result)
    for reason in RETRY_REASONS:
        RETRIES.labels(name, reason)
    for how in REF_RESULTS:
        REF_RESOLUTIONS.labels(name, how)
    for result in ("ok", "error"):
        PACK_RANGES.labels(name, result)
    DEDUP_HITS.labels(name)
    DIGEST_MISMATCHES.labels(name)
    DURATION.labels(name, "ok")


#: Every metric name this module exports (as scraped: counters get a ``_total`` suffix).
NAMES = (
    _P + "bytes_total",
    _P + "objects_total",
    _P + "dedup_hits_total",
    _P + "digest_mismatches_total",
    _P + "retries_total",
    _P + "ref_resolutions_total",
    _P + "pack_ranges_total",
    _P + "duration_seconds",
)
