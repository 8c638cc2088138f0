"""The ``composefs-csi`` command: publish images, inspect them, manage a node store, run the driver.

Each subcommand lives in its own module and is imported only when used.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from csi import __version__
from csi.cli.packing import add_pack_arguments
from csi.limits import raise_open_files_limit

EPILOG = """\
Publishing:   composefs-csi build ./tree --repo ./repo --ref app:v1
              composefs-csi import docker://registry.example/app:v1 --repo ./repo --ref app:v1
Inspecting:   composefs-csi inspect app:v1 --repo ./repo [--dump]
Node side:    composefs-csi pull app:v1 --repository https://repo.example/ --store /var/lib/store
Driver:       composefs-csi node --config config.yaml --endpoint unix:///csi/csi.sock
"""


def _add_build(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "build",
        help="build a composefs image from a directory or a dump file into a repository",
        description=(
            "Build a composefs image (byte-identical to mkcomposefs) from SRC, store the "
            "files' contents as objects and the image in the repository, and print the "
            "image digest. SRC is a directory, or a composefs-dump file with --from-dump."
        ),
    )
    p.add_argument("src", help="source directory (or dump file with --from-dump)")
    p.add_argument("--repo", required=True, help="repository directory (created if missing)")
    p.add_argument("--ref", action="append", default=[], help="also name the image (repeatable)")
    p.add_argument("--from-dump", action="store_true", help="SRC is a composefs-dump text file")
    p.add_argument("--use-epoch", action="store_true", help="set every mtime to 0")
    p.add_argument(
        "--xattrs",
        choices=("all", "user", "none"),
        default="all",
        help="which extended attributes to record (default: all)",
    )
    p.add_argument(
        "--no-hardlinks",
        action="store_true",
        help="give every path its own inode (what mkcomposefs 1.0.8 does for directories)",
    )
    p.add_argument("--min-version", type=int, default=0, choices=(0, 1))
    p.add_argument("--max-version", type=int, default=1, choices=(0, 1))
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="processes copying and hashing files (default: 2 per CPU, at most 16)",
    )
    p.add_argument("--image-out", help="also write the image to this file")
    add_pack_arguments(p)
    p.set_defaults(module="build")


def _add_import(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "import",
        help="import an OCI image or artifact (registry, OCI layout, docker archive)",
        description=(
            "Import SOURCE into the repository: file contents become objects, the tree a "
            "composefs image, and the image digest is printed. SOURCE uses skopeo's syntax: "
            "docker://HOST/NAME:TAG (or @sha256:...), oci:DIR[:TAG], docker-archive:FILE. "
            "Layers are applied with their whiteouts into one image (--flatten, default), or "
            "each becomes its own image with overlay whiteouts (--layers), for compositions. "
            "An artifact's plain-file layers become files named by their "
            "org.opencontainers.image.title. The source and manifest digest are recorded "
            "under provenance/ (see inspect). Nothing is left behind if the import fails."
        ),
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--repo", required=True, help="repository directory (created if missing)")
    p.add_argument(
        "--ref",
        action="append",
        default=[],
        help="also name the image (repeatable); with --layers, layer N is NAME-layerN",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--flatten", action="store_true", help="one image of the whole tree (the default)"
    )
    mode.add_argument("--layers", action="store_true", help="one image per layer, lowest first")
    p.add_argument(
        "--platform", help="OS/ARCH[/VARIANT] to pick from an index (default: this host's)"
    )
    p.add_argument("--creds-file", help="file holding USER:PASSWORD for the registry")
    p.add_argument(
        "--authfile",
        help="a docker/podman config.json with credentials (default: the usual locations)",
    )
    p.add_argument("--ca-bundle", help="PEM file of CAs to trust for the registry")
    p.add_argument(
        "--plain-http", action="store_true", help="talk plain HTTP to the registry (no TLS)"
    )
    add_pack_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(module="import_cmd")


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarise an image, or print it as composefs-dump text",
        description=(
            "IMAGE_OR_REF is an image file, or with --repo a digest (sha256:<hex> or <hex>) "
            "or a ref name in that repository."
        ),
    )
    p.add_argument("image", metavar="IMAGE_OR_REF")
    p.add_argument("--repo", help="repository to look the image up in")
    p.add_argument("--dump", action="store_true", help="print the composefs-dump text")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(module="inspect_cmd")


def _add_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="check every object and image of a repository against its name",
    )
    p.add_argument("--repo", required=True, help="repository directory")
    p.set_defaults(module="verify")


def _add_store_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "pull",
        help="fetch an image and the objects a store lacks from a repository",
    )
    p.add_argument("ref", metavar="REF", help="sha256:<hex> or a ref name")
    p.add_argument(
        "--repository",
        required=True,
        action="append",
        help="repository URL or path (repeat for mirrors, tried in order)",
    )
    p.add_argument("--store", required=True, help="node store directory (created if missing)")
    p.add_argument("--concurrency", type=int, default=16, help="parallel downloads (default 16)")
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes that download, hash and write objects when there are 64 or "
        "more (default: 2 per CPU, at most 8; 0: none)",
    )
    p.add_argument("--allow-plain-http", action="store_true", help="permit http:// URLs")
    p.add_argument("--ca-bundle", help="PEM file of CAs to trust for https")
    p.add_argument("--bearer-token-file", help="file holding a bearer token")
    p.set_defaults(module="store_cmds", func_name="pull")

    p = sub.add_parser(
        "gc",
        help="collect unused images and objects of a store",
        description=(
            "Remove images no volume holds a lease on (least recently used first) and then "
            "every object no remaining image references. Without --target-bytes every "
            "unleased image goes; with it, only as many as needed to fit."
        ),
    )
    p.add_argument("--store", required=True)
    p.add_argument("--dry-run", action="store_true", help="report what would be removed")
    p.add_argument(
        "--target-bytes", type=int, help="free until the store holds at most this many bytes"
    )
    p.set_defaults(module="store_cmds", func_name="gc")

    p = sub.add_parser("fsck", help="verify every object and image of a store")
    p.add_argument("--store", required=True)
    p.add_argument(
        "--no-repair", action="store_true", help="only report; do not quarantine bad files"
    )
    p.set_defaults(module="store_cmds", func_name="fsck")


def _add_runtime_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "mount",
        help="mount one image locally through FUSE, in the foreground (Ctrl-C unmounts)",
    )
    p.add_argument("ref", metavar="REF")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--repository", required=True, action="append", help="URL or path")
    p.add_argument("--store", required=True)
    p.add_argument("--lazy", action="store_true", help="serve before every object is local")
    p.add_argument("--allow-plain-http", action="store_true")
    p.set_defaults(module="runtime", func_name="mount")

    p = sub.add_parser("dataplane", help="run the node-wide FUSE data plane")
    p.add_argument("--config", required=True, help="driver configuration file (YAML)")
    p.set_defaults(module="runtime", func_name="dataplane")

    for name, helptext in (
        ("node", "run the CSI node plugin (Identity + Node services)"),
        ("controller", "run the CSI controller (Identity + Controller services)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", required=True, help="driver configuration file (YAML)")
        p.add_argument(
            "--endpoint",
            default="unix:///csi/csi.sock",
            help="gRPC endpoint, unix:///path (default unix:///csi/csi.sock)",
        )
        if name == "node":
            p.add_argument(
                "--node-id",
                help="node name reported to Kubernetes (default: $NODE_NAME, else hostname)",
            )
        p.set_defaults(module="runtime", func_name=name)

    p = sub.add_parser(
        "probe",
        help="ask a running plugin's Identity service whether it is ready (for health checks)",
        description="Exit 0 when Probe answers ready, 1 otherwise (the reason is printed).",
    )
    p.add_argument(
        "--endpoint",
        default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"),
        help="gRPC endpoint (default: $CSI_ENDPOINT, else unix:///csi/csi.sock)",
    )
    p.add_argument("--timeout", type=float, default=8.0, help="seconds to wait (default 8)")
    p.set_defaults(module="runtime", func_name="probe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composefs-csi",
        description=(
            "composefs-csi: content-addressed, deduplicated read-only volumes for Kubernetes."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_build(sub)
    _add_import(sub)
    _add_inspect(sub)
    _add_verify(sub)
    _add_store_commands(sub)
    _add_runtime_commands(sub)
    return parser


#: Commands that keep the interpreter's default collector thresholds: the data plane serves
#: FUSE requests (short-lived objects, and its memory is held to a bar).
GC_DEFAULT_COMMANDS = frozenset({"dataplane"})


def tune_gc() -> None:
    """Collect cyclic garbage less often than the interpreter's default. A fetch or a build
    keeps a few objects per file of an image alive (its tasks, index entries, tree nodes);
    with the default thresholds the collector scans all of them again every time their
    number grows by a quarter: 1.4-2.6 s of full passes in a 100k-file pull, about a
    quarter of the process's CPU (docs/benchmarks.md). Young garbage is still collected,
    after 100,000 new objects instead of 700."""
    gc.freeze()  # what the imports made is never garbage: out of every later pass
    gc.set_threshold(100_000, 50, 100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(f"csi.cli.{args.module}")
    func = getattr(module, getattr(args, "func_name", "run"))
    if args.command not in GC_DEFAULT_COMMANDS:
        tune_gc()
    raise_open_files_limit()  # claims, workers and the data plane hold many files open
    try:
        return int(func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every error the commands expect ends here with a clear message
        from csi.cli.errors import describe

        message = describe(e)
        if message is None:
            raise
        print(f"composefs-csi {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
