"""Prometheus metrics of the CSI servers (in :data:`csi.metrics.REGISTRY`), and the HTTP
endpoint that serves the whole registry (store, fetch and server metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from csi.metrics import REGISTRY

_P = "composefs_csi_"

GRPC_REQUESTS = Counter(
    _P + "grpc_requests",
    "CSI gRPC requests answered, by method and status code",
    ["method", "code"],
    registry=REGISTRY,
)
GRPC_DURATION = Histogram(
    _P + "grpc_request_duration_seconds",
    "Time to answer a CSI gRPC request, by method",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
PUBLISH_DURATION = Histogram(
    _P + "publish_duration_seconds",
    "Successful NodePublishVolume/NodeStageVolume work, by fetch mode and whether every image "
    "was already local (cache=warm) or had to be fetched (cache=cold)",
    ["fetch", "cache"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
VOLUMES_PUBLISHED = Gauge(
    _P + "volumes_published", "Target paths with a published volume on this node", registry=REGISTRY
)
VOLUMES_STAGED = Gauge(
    _P + "volumes_staged", "Persistent volumes staged on this node", registry=REGISTRY
)
MOUNTS_REPAIRED = Counter(
    _P + "mounts_repaired",
    "Published volumes found broken or missing and mounted again",
    registry=REGISTRY,
)
MOUNTS_CLEANED = Counter(
    _P + "mounts_cleaned",
    "Half-done publishes or unpublishes found at start-up and undone or finished",
    registry=REGISTRY,
)


def init_labels(services: list[str]) -> None:
    """Give the served methods and the publish outcomes their series at zero (code OK), so
    an idle plugin's dashboard panels show 0 rather than "No data". ``services``: the CSI
    services this process serves (``Identity``, ``Node``, ``Controller``)."""
    from .proto import csi_pb2

    for name in services:
        for method in csi_pb2.DESCRIPTOR.services_by_name[name].methods:
            GRPC_REQUESTS.labels(method.name, "OK")
            GRPC_DURATION.labels(method.name)
    if "Node" in services:
        for mode in ("eager", "lazy"):
            for cache in ("warm", "cold"):
                PUBLISH_DURATION.labels(mode, cache)


def parse_address(address: str) -> tuple[str, int] | None:
    """``"host:port"`` or ``":port"`` -> (host, port); ``""`` -> None (disabled)."""
    address = address.strip()
    if not address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r} is not host:port or :port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def serve_metrics(address: str) -> tuple[str, int] | None:
    """Serve :data:`csi.metrics.REGISTRY` on ``address`` (``/metrics``); returns where, or
    None if disabled."""
    where = parse_address(address)
    if where is None:
        return None
    server, _thread = start_http_server(where[1], addr=where[0], registry=REGISTRY)
    return where[0], int(server.server_port)
