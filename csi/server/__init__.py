"""The CSI gRPC servers (Identity, Node, Controller): thin handlers over the store, the fetcher
and the FUSE data plane. Entry points: :func:`serve_node`, :func:`serve_controller`."""

from .serve import build_controller, build_node, serve_controller, serve_node

__all__ = ["build_controller", "build_node", "serve_controller", "serve_node"]
