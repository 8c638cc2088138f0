"""Prometheus metrics of the FUSE data plane (registered in :data:`csi.metrics.REGISTRY`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from csi.metrics import REGISTRY

OPERATIONS = Counter(
    "composefs_csi_fuse_operations",
    "FUSE requests served, by operation.",
    ["op"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "composefs_csi_fuse_errors",
    "FUSE requests answered with an error, by operation and errno name.",
    ["op", "errno"],
    registry=REGISTRY,
)
READ_BYTES = Counter(
    "composefs_csi_fuse_read_bytes",
    "Bytes returned by FUSE read requests.",
    registry=REGISTRY,
)
OPEN_FILES = Gauge(
    "composefs_csi_fuse_open_files",
    "Files currently open through the FUSE mount.",
    registry=REGISTRY,
)
OBJECT_FDS = Gauge(
    "composefs_csi_fuse_object_fds",
    "Object files held open by the data plane (in use and cached).",
    registry=REGISTRY,
)
LAZY_FETCH_WAIT = Histogram(
    "composefs_csi_fuse_lazy_fetch_wait_seconds",
    "Time an open waited for a lazily fetched object.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
LAZY_FETCHES = Counter(
    "composefs_csi_fuse_lazy_fetches",
    "Objects fetched for lazy views, by trigger (demand or prefetch) and result.",
    ["trigger", "result"],
    registry=REGISTRY,
)
READAHEAD_FILES = Counter(
    "composefs_csi_fuse_readahead_files",
    "Files read ahead of their reads (the next files of a directory read file by file): "
    "stored in the page cache of their FUSE inodes, or where the kernel cannot, their "
    "objects handed to the page cache.",
    registry=REGISTRY,
)
PAGES_STORED_BYTES = Counter(
    "composefs_csi_fuse_readahead_stored_bytes",
    "Bytes of files read ahead stored straight into the page cache of their FUSE inodes "
    "(notify_store): reads of them cost the data plane no request.",
    registry=REGISTRY,
)
MISSING_OBJECTS = Counter(
    "composefs_csi_fuse_missing_objects",
    "Opens that failed because the object was not in the store (and could not be fetched).",
    registry=REGISTRY,
)
VIEWS = Gauge(
    "composefs_csi_fuse_views",
    "Views served, by kind (image or composition).",
    ["kind"],
    registry=REGISTRY,
)
KERNEL_OPENS = Gauge(
    "composefs_csi_fuse_kernel_opens",
    "1 when the kernel opens files and directories itself and keeps their contents and "
    "listings cached (pyfuse3 with the inode_as_fh patch); 0 with stock pyfuse3, where every "
    "open, close and directory listing is a request to the data plane (slower).",
    registry=REGISTRY,
)
VIEW_HOLDERS = Gauge(
    "composefs_csi_fuse_view_holders",
    "Holders (volumes) of all views served.",
    registry=REGISTRY,
)


def init_labels() -> None:
    """Give the labelled metrics their known label sets at zero, so an idle data plane's
    dashboard panels show 0 rather than "No data"."""
    for trigger in ("demand", "prefetch"):
        for result in ("ok", "error"):
            LAZY_FETCHES.labels(trigger, result)
    for kind in ("image", "composition"):
        VIEWS.labels(kind)
