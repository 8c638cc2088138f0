"""``python -m csi.fuse CONFIG.json``: run the data plane daemon from a JSON configuration.

For tests and development; the product entry point is ``composefs-csi dataplane``. The JSON
object has the fields of :class:`csi.fuse.config.DataPlaneConfig` (paths as strings, lists
for tuples).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from csi.fetch.config import RepositoryConfig

from .config import DataPlaneConfig
from .daemon import run_daemon


def config_from_dict(data: dict[str, Any]) -> DataPlaneConfig:
    d = dict(data)
    for key in ("mountpoint", "control_socket", "store"):
        d[key] = Path(d[key])
    if "mount_options" in d:
        d["mount_options"] = tuple(d["mount_options"])
    # A repository is a URL/path string or a mapping of RepositoryConfig fields.
    d["repositories"] = {
        name: spec if isinstance(spec, str) else RepositoryConfig.from_dict({"name": name, **spec})
        for name, spec in d.get("repositories", {}).items()
    }
    return DataPlaneConfig(**d)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m csi.fuse CONFIG.json", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = config_from_dict(json.loads(Path(args[0]).read_text()))
    profile = os.environ.get("CSI_FUSE_PROFILE")
    if profile:  # development aid: profile the whole daemon into this file
        import cProfile

        cProfile.runctx("run_daemon(config)", globals(), {"config": config}, profile)
    else:
        run_daemon(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
