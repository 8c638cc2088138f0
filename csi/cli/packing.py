"""The pack options ``build`` and ``import`` share (``--pack``, ``--compress``,
``--pack-max-object``) and the line that reports what was packed. (Imported by the argument
parser for every command: :mod:`csi.repo.packs` only once packs are asked for.)"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from csi.repo import Repository
    from csi.repo.packs import PackOptions, PackReport


def add_pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pack",
        action="store_true",
        help="also write the image's small objects into pack files with an index (packs/), "
        "so that nodes fetch them with a few range requests; and for each --ref, deltas to "
        "the image from the ref's previous image and those of the refs beside it, and a "
        "pointer, so that nodes holding one fetch the delta instead (docs/publishing.md)",
    )
    p.add_argument(
        "--compress",
        type=int,
        metavar="LEVEL",
        help="pack (implies --pack) with zstd-compressed entries at this level (1-19; 3 is a "
        "good choice), keeping a frame only where it saves at least 5%%",
    )
    p.add_argument(
        "--pack-max-object",
        type=int,
        metavar="BYTES",
        help="largest object written into packs (default 1 MiB)",
    )


def pack_options(args: argparse.Namespace, command: str) -> PackOptions | None:
    """What the arguments ask for (None: no packs); exits with a message if they are wrong."""
    if not args.pack and args.compress is None:
        return None
    from csi.repo.packs import DEFAULT_MAX_OBJECT, PackOptions

    try:
        return PackOptions(
            max_object=DEFAULT_MAX_OBJECT if args.pack_max_object is None else args.pack_max_object,
            level=args.compress,
        )
    except ValueError as e:
        raise SystemExit(f"composefs-csi {command}: --compress/--pack-max-object: {e}") from None


def pack_summary(report: PackReport) -> str:
    saved = ""
    if report.raw_bytes:
        saved = f" ({report.stored_bytes / report.raw_bytes:.0%} of their size)"
    return (
        f"packs: {report.objects} object(s) indexed, {report.written} written into "
        f"{len(report.packs)} new pack(s){saved}, {report.reused} already in packs"
    )


def publish_ref_with_deltas(repo: Repository, ref: str, digest: bytes) -> str:
    """Move ``ref`` to image ``digest`` in a packed repository: first deltas to the image from
    the images a node is likely to hold (the ref's previous one, those of the refs beside
    it), then the ref, then its pointer (:mod:`csi.repo.refdeltas`); the line to report."""
    from csi.repo.refdeltas import choose_bases, write_pointer, write_ref_deltas

    report = write_ref_deltas(repo, digest, choose_bases(repo, ref, digest))
    repo.set_ref(ref, digest)
    pointer = write_pointer(repo, ref, digest)
    made = ""
    if report.deltas:
        made = f" ({report.deltas} new, {report.delta_bytes} bytes in all)"
    return f"ref {ref}: {len(pointer.deltas)} delta(s) to its {pointer.size}-byte image{made}"
