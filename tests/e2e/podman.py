"""Running podman with the harness's own configuration (never the machine's global one)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

#: What podman needs on these machines (docs/e2e.md): the VM lacks CAP_SYS_RESOURCE, so the
#: default rlimits fail with EPERM; crun refuses the hybrid cgroup v1+v2 layout, runc does not.
CONTAINERS_CONF = """\
# Written by the composefs-csi e2e harness (tests/e2e/podman.py); used through CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""

#: Label on every container the harness starts: the run that owns it.
LABEL = "io.composefs-csi.e2e-run"


class PodmanError(RuntimeError):
    pass


def containers_conf(state_dir: Path) -> Path:
    """``$CONTAINERS_CONF`` if set, else the harness's own file in ``state_dir``."""
    given = os.environ.get("CONTAINERS_CONF")
    if given:
        return Path(given)
    path = state_dir / "containers.conf"
    if not path.exists() or path.read_text() != CONTAINERS_CONF:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(CONTAINERS_CONF)
        tmp.replace(path)
    return path


class Podman:
    def __init__(self, conf: Path) -> None:
        self.conf = conf
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
            check=False,
        )
        if check and proc.returncode != 0:
            cmd = " ".join(args[:6]) + (" ..." if len(args) > 6 else "")
            raise PodmanError(
                f"podman {cmd}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )
        return proc

    def out(self, *args: str, timeout: float = 600) -> str:
        return self.run(*args, timeout=timeout).stdout.strip()

    def inspect(self, name: str) -> dict[str, Any]:
        data = json.loads(self.out("container", "inspect", name))
        if not data:
            raise PodmanError(f"no container {name}")
        first: dict[str, Any] = data[0]
        return first

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0

    def containers(self, run_id: str | None = None, *, all_states: bool = True) -> list[str]:
        """Names of the harness's containers (of one run, or of every run)."""
        flt = f"label={LABEL}" + (f"={run_id}" if run_id else "")
        args = ["ps", "--filter", flt, "--format", "{{.Names}}"]
        if all_states:
            args.insert(1, "-a")
        return [n for n in self.out(*args).splitlines() if n]

    def runs_with_containers(self) -> set[str]:
        """Run ids that still own containers."""
        text = self.out("ps", "-a", "--filter", f"label={LABEL}", "--format", "json")
        return {c.get("Labels", {}).get(LABEL, "") for c in json.loads(text or "[]")} - {""}
