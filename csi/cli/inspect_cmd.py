"""``composefs-csi inspect``: a summary of an image, or its composefs-dump text."""

from __future__ import annotations

import argparse
import json
import stat
import sys
from pathlib import Path
from typing import Any

from csi.image.dump import format_dump
from csi.image.errors import FormatError
from csi.image.reader import Image


def _open_image(args: argparse.Namespace) -> tuple[Image, str | None, dict[str, Any] | None]:
    digest: str | None = None
    provenance: dict[str, Any] | None = None
    if args.repo:
        from csi.repo import Repository
        from csi.repo import provenance as prov

        repo = Repository(Path(args.repo))
        raw = repo.resolve_ref(args.image)
        path, digest = repo.image_path(raw), raw.hex()
        # Where the image came from (composefs-csi import): the ref's own record, else the
        # image's (every source it was imported from).
        provenance = prov.ref_record(repo, args.image) if not _is_digest(args.image) else None
        if provenance is None:
            sources = prov.image_sources(repo, raw)
            provenance = sources[0] if len(sources) == 1 else None
            if len(sources) > 1:
                provenance = {"sources": sources}
    else:
        path = Path(args.image)
    try:
        return Image.open(path), digest, provenance
    except FormatError as e:
        raise FormatError(f"{path} is not a valid composefs image: {e}") from None


def _is_digest(text: str) -> bool:
    from csi.repo.layout import is_hex_digest

    return text.startswith("sha256:") or is_hex_digest(text.lower())


def summarise(image: Image) -> dict[str, object]:
    """Counts and sizes of an image, walking it once (validates it on the way)."""
    image.validate()
    counts = {"directories": 0, "files": 0, "symlinks": 0, "other": 0}
    inline_bytes = external_bytes = 0
    seen: set[int] = set()
    stack = [image.root_nid]
    while stack:  # the tree as a mount shows it: whiteout stubs hidden, hard links once
        nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        a = image.getattr(nid)
        kind = stat.S_IFMT(a.mode)
        if kind == stat.S_IFDIR:
            counts["directories"] += 1
            stack.extend(child for _, child, _ in image.readdir(nid))
        elif kind == stat.S_IFREG:
            counts["files"] += 1
            if image.is_external(nid):
                external_bytes += a.size
            else:
                inline_bytes += a.size
        elif kind == stat.S_IFLNK:
            counts["symlinks"] += 1
        else:
            counts["other"] += 1
    return {
        "composefs_version": image.version,
        "image_bytes": image.size,
        "inodes": len(seen),
        **counts,
        "file_bytes": inline_bytes + external_bytes,
        "inline_bytes": inline_bytes,
        "external_bytes": external_bytes,
        "objects": len(image.object_digests()),
    }


def run(args: argparse.Namespace) -> int:
    image, digest, provenance = _open_image(args)
    with image:
        if args.dump:
            out = sys.stdout.buffer
            out.write(format_dump(image.to_tree(keep_opaque_markers=True)))
            out.flush()
            return 0
        info = summarise(image)
    if digest is None:
        from csi.image.fsverity import digest_file

        digest = digest_file(args.image).hex()
    info = {"digest": f"sha256:{digest}", **info}
    if args.json:
        if provenance is not None:
            info["provenance"] = provenance
        print(json.dumps(info, indent=2))
    else:
        if provenance is not None:
            for src in provenance.get("sources", [provenance]):
                info["source"] = src.get("source")
                info["manifest_digest"] = src.get("manifest_digest") or "-"
                if src.get("platform"):
                    info["platform"] = src["platform"]
                if src.get("layer_index") is not None:
                    info["layer"] = f"{src['layer_index'] + 1} of {len(src.get('layers') or [])}"
                break
            if "sources" in provenance:
                info["sources"] = len(provenance["sources"])
        width = max(len(k) for k in info)
        for key, value in info.items():
            shown = f"{value:,}" if isinstance(value, int) and "version" not in key else value
            print(f"{key.replace('_', ' '):<{width}}  {shown}")
    return 0
