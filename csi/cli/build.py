"""``composefs-csi build``: publish a directory (or a dump file) as a composefs image.

Every external file is read exactly once: worker processes copy it into the repository's temp
area while computing its fs-verity digest; it is renamed to its digest after one filesystem
sync per batch (or dropped when the repository already holds that object). The image is written
last, so a repository never names an image whose objects are not all present.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from csi.cli.packing import pack_options, pack_summary, publish_ref_with_deltas
from csi.cli.progress import Bar
from csi.image.dump import parse_dump
from csi.image.fromdir import ScanOptions, scan_directory
from csi.image.fsverity import digest_bytes
from csi.image.tree import Tree, object_path
from csi.image.writer import write_image
from csi.repo import Repository
from csi.repo.packs import pack_tree
from csi.repo.parallel import default_processes, store_files


def build_from_directory(
    src: Path, repo: Repository, options: ScanOptions, *, show_progress: bool | None = None
) -> tuple[Tree, int, int]:
    """Scan ``src`` into a tree, storing every external file as an object of ``repo``.

    Returns (tree, objects added now, objects already present).
    """
    result = scan_directory(src, dataclasses.replace(options, compute_digest=False))
    processes = options.threads or default_processes()
    with Bar(f"building {src}", enabled=show_progress) as bar:
        bar.update_to(0, result.bytes)
        digests, added, present = store_files(
            repo,
            [path for _, path in result.unhashed],
            processes=processes,
            progress=lambda files, done: bar.update_to(done),
        )
    for (node, _), digest in zip(result.unhashed, digests, strict=True):
        node.digest = digest
        node.payload = object_path(digest)
    return result.tree, added, present


def run(args: argparse.Namespace) -> int:
    if args.min_version > args.max_version:
        raise SystemExit("composefs-csi build: --min-version is above --max-version")
    pack = pack_options(args, "build")  # refused before any work
    repo = Repository(Path(args.repo), create=True)
    src = Path(args.src)
    if args.from_dump:
        tree = parse_dump(src.read_bytes())
        missing = sorted(
            {n.digest.hex() for _, n in tree.bfs() if n.is_external and n.digest is not None}
            - {d.hex() for d in repo.iter_objects()}
        )
        added = present = 0
        if missing:
            print(
                f"warning: {len(missing)} object(s) named by the dump are not in the repository "
                f"(e.g. {missing[0]}); copy them into objects/ before serving the image",
                file=sys.stderr,
            )
    else:
        options = ScanOptions(
            use_epoch=args.use_epoch,
            xattrs=args.xattrs,
            hardlinks=not args.no_hardlinks,
            threads=args.jobs or None,
        )
        tree, added, present = build_from_directory(src, repo, options)
    image = write_image(tree, min_version=args.min_version, max_version=args.max_version)
    if pack is not None:
        # Before the image is linked: a client that sees the image may look for its index.
        print(pack_summary(pack_tree(repo, digest_bytes(image), tree, pack)), file=sys.stderr)
    digest = repo.add_image(image)
    for ref in args.ref:
        if pack is None:
            repo.set_ref(ref, digest)
        else:
            print(publish_ref_with_deltas(repo, ref, digest), file=sys.stderr)
    if args.image_out:
        Path(args.image_out).write_bytes(image)
    print(
        f"stored {added} new object(s), {present} already present; image {len(image)} bytes",
        file=sys.stderr,
    )
    print(f"sha256:{digest.hex()}")
    return 0
