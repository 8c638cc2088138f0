"""Prometheus metrics of the per-node store (registered in :data:`csi.metrics.REGISTRY`).

Gauges describe the most recently updated store of the process (a node has one).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from csi.metrics import REGISTRY

_P = "composefs_csi_store_"

STORE_BYTES = Gauge(_P + "bytes", "Bytes held in the store (objects and images)", registry=REGISTRY)
STORE_OBJECTS = Gauge(
    _P + "objects", "Files held in the store (objects and images)", registry=REGISTRY
)
STORE_IMAGES = Gauge(_P + "images", "Images held in the store", registry=REGISTRY)
LEASES = Gauge(_P + "leases", "Lease holders (volumes) recorded in the store", registry=REGISTRY)
LEASED_IMAGES = Gauge(_P + "leased_images", "Distinct images under a lease", registry=REGISTRY)
OBJECTS_ADDED = Counter(
    _P + "objects_added", "Objects and images written into the store", registry=REGISTRY
)
BYTES_ADDED = Counter(_P + "bytes_added", "Bytes written into the store", registry=REGISTRY)
DEDUP_HITS = Counter(
    _P + "dedup_hits", "Objects asked for that were already present", registry=REGISTRY
)
DIGEST_MISMATCHES = Counter(
    _P + "digest_mismatches",
    "Writes rejected because the content did not match its digest",
    registry=REGISTRY,
)
VERITY_ENABLED = Counter(
    _P + "verity_enabled", "Stored files on which kernel fs-verity was enabled", registry=REGISTRY
)
GC_RUNS = Counter(_P + "gc_runs", "Garbage collections run (dry runs excluded)", registry=REGISTRY)
GC_FREED_BYTES = Counter(
    _P + "gc_freed_bytes", "Bytes freed by garbage collection", registry=REGISTRY
)
STORE_FULL = Counter(
    _P + "full", "Writes that failed for lack of space after garbage collection", registry=REGISTRY
)
FSCK_BAD = Counter(_P + "fsck_bad", "Bad files found by fsck", registry=REGISTRY)

#: Every metric name this module exports (as scraped: counters get a ``_total`` suffix).
NAMES = (
    _P + "bytes",
    _P + "objects",
    _P + "images",
    _P + "leases",
    _P + "leased_images",
    _P + "objects_added_total",
    _P + "bytes_added_total",
    _P + "dedup_hits_total",
    _P + "digest_mismatches_total",
    _P + "verity_enabled_total",
    _P + "gc_runs_total",
    _P + "gc_freed_bytes_total",
    _P + "full_total",
    _P + "fsck_bad_total",
)
