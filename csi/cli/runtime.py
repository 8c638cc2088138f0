"""Long-running commands: ``mount``, ``dataplane``, ``node`` and ``controller``."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path


def mount(args: argparse.Namespace) -> int:
    from csi.fuse.mountcmd import mount_command

    return mount_command(
        args.ref,
        Path(args.mountpoint),
        list(args.repository),
        Path(args.store),
        lazy=args.lazy,
        allow_plain_http=args.allow_plain_http,
    )


def dataplane(args: argparse.Namespace) -> int:
    from csi.config import load_config
    from csi.fuse.config import DataPlaneConfig
    from csi.fuse.daemon import run_daemon

    cfg = load_config(args.config)
    dp = cfg.dataplane
    run_daemon(
        DataPlaneConfig(
            mountpoint=dp.mountpoint,
            control_socket=dp.socket,
            store=cfg.store.path,
            repositories=cfg.repositories,
            default_repository=cfg.default_repository,
            read_ahead_kb=dp.read_ahead_kb,
            mount_options=dp.mount_options,
            fd_cache_size=dp.open_files,
            readahead_files=dp.readahead_files,
            metrics_address=_address(dp.metrics_address),
        )
    )
    return 0


def _address(address: str) -> str | None:
    """``":9810"`` -> ``"0.0.0.0:9810"``; ``""`` disables the endpoint."""
    if not address:
        return None
    return f"0.0.0.0{address}" if address.startswith(":") else address


def node(args: argparse.Namespace) -> int:
    from csi.server.serve import serve_node

    node_id = args.node_id or os.environ.get("NODE_NAME") or socket.gethostname()
    serve_node(args.config, args.endpoint, node_id)
    return 0


def controller(args: argparse.Namespace) -> int:
    from csi.server.serve import serve_controller

    serve_controller(args.config, args.endpoint)
    return 0


def probe(args: argparse.Namespace) -> int:
    import sys

    import grpc

    from csi.server.proto import csi_pb2, csi_pb2_grpc

    target = args.endpoint if args.endpoint.startswith("unix:") else f"unix://{args.endpoint}"
    with grpc.insecure_channel(target) as channel:
        try:
            reply = csi_pb2_grpc.IdentityStub(channel).Probe(
                csi_pb2.ProbeRequest(), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"not ready: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if reply.HasField("ready") and not reply.ready.value:
        print("not ready", file=sys.stderr)
        return 1
    print("ready")
    return 0
