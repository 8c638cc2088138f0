"""``composefs-csi import``: publish an OCI image or artifact as composefs image(s)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from csi.cli.packing import pack_options, pack_summary
from csi.cli.progress import Bar
from csi.oci.importer import ImportOptions, ImportResult, run_import
from csi.oci.platform import parse_platform
from csi.repo import Repository


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def summary(r: ImportResult) -> str:
    origin = r.manifest_digest or r.config_digest or "?"
    lines = [
        f"imported {r.source} ({r.kind}, {origin}"
        + (f", {r.platform}" if r.platform else "")
        + f"): {r.layer_count} layer(s), {r.files} file content(s) of {_size(r.file_bytes)}",
        f"stored {r.new_objects} new object(s) ({_size(r.new_bytes)}), "
        f"{r.present_objects} already present",
    ]
    if len(r.images) > 1:
        lines.append(
            'layer images, lowest first (volumeAttributes layers: "'
            + ",".join(f"sha256:{d.hex()}" for d in r.images)
            + '")'
        )
    if r.refs:
        lines.append(f"refs: {', '.join(r.refs)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    # The read-ahead thread (csi.oci.prefetch) hands each decompressed piece over between two
    # long C calls; with the default 5 ms switch interval it waits that long for the GIL each
    # time, behind the thread parsing and hashing. 1 ms: 1 GiB imported in 6.2-7.3 s instead
    # of 7.5-10.5 s here (docs/benchmarks.md). This process does nothing else.
    sys.setswitchinterval(0.001)
    repo = Repository(Path(args.repo), create=True)
    options = ImportOptions(
        platform=parse_platform(args.platform) if args.platform else None,
        layers=args.layers,
        refs=list(args.ref),
        creds_file=args.creds_file,
        authfile=args.authfile,
        ca_bundle=args.ca_bundle,
        plain_http=args.plain_http,
        pack=pack_options(args, "import"),
    )
    with Bar(f"importing {args.source}") as bar:

        def progress(done: int, total: int, what: str) -> None:
            if what:
                bar.set_postfix(what)
            bar.update_to(done, total)

        result = run_import(args.source, repo, options, progress)
    if args.json:
        print(
            json.dumps(
                {
                    "source": result.source,
                    "kind": result.kind,
                    "manifest_digest": result.manifest_digest,
                    "config_digest": result.config_digest,
                    "platform": result.platform,
                    "images": [f"sha256:{d.hex()}" for d in result.images],
                    "refs": result.refs,
                    "layers": result.layer_count,
                    "files": result.files,
                    "file_bytes": result.file_bytes,
                    "new_objects": result.new_objects,
                    "new_bytes": result.new_bytes,
                    "present_objects": result.present_objects,
                    "packs": [
                        {
                            "objects": p.objects,
                            "written": p.written,
                            "reused": p.reused,
                            "new_packs": len(p.packs),
                        }
                        for p in result.packs
                    ],
                },
                indent=2,
            )
        )
        return 0
    print(summary(result), file=sys.stderr)
    for report in result.packs:
        print(pack_summary(report), file=sys.stderr)
    for digest in result.images:
        print(f"sha256:{digest.hex()}")
    return 0
