"""The process-wide Prometheus registry.

Every layer defines its own metrics in its own module and registers them here, so the node and
controller servers expose one registry and tests can read metric names from it.
"""

from prometheus_client import CollectorRegistry

REGISTRY = CollectorRegistry(auto_describe=True)
