"""Rendering charts/composefs-csi with chart-render (a ``helm template`` work-alike) and finding
the objects the harness runs: workloads by component label, ConfigMaps, StorageClasses."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "composefs-csi"
COMPONENT = "app.kubernetes.io/component"

Doc = dict[str, Any]


class ChartError(RuntimeError):
    pass


def renderer() -> Path:
    """chart-render from ``$CHART_RENDER``, ``<repo>/../shared/tools/bin`` or ``PATH`` (as
    scripts/render-manifests.sh and tests/test_chart.py find it)."""
    env = os.environ.get("CHART_RENDER")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "tools" / "bin" / "chart-render")
    found = shutil.which("chart-render")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise ChartError(
        "chart-render not found: set CHART_RENDER, or put it at ../shared/tools/bin/chart-render "
        "beside the repository or on PATH"
    )


@dataclass(frozen=True)
class Rendered:
    docs: list[Doc]
    release: str
    namespace: str

    def workload(self, component: str) -> Doc:
        """The DaemonSet or Deployment of ``component`` (dataplane, node, controller)."""
        found = [
            d
            for d in self.docs
            if d.get("kind") in ("DaemonSet", "Deployment")
            and d["spec"]["template"]["metadata"].get("labels", {}).get(COMPONENT) == component
        ]
        if len(found) != 1:
            raise ChartError(f"expected one workload of component {component}, got {len(found)}")
        return found[0]

    def configmaps(self) -> dict[str, dict[str, str]]:
        return {
            d["metadata"]["name"]: dict(d.get("data") or {})
            for d in self.docs
            if d.get("kind") == "ConfigMap"
        }

    def storage_class(self, name: str) -> Doc:
        for d in self.docs:
            if d.get("kind") == "StorageClass" and d["metadata"]["name"] == name:
                return d
        raise ChartError(f"no StorageClass {name} in the rendered chart")

    def csi_driver(self) -> Doc:
        for d in self.docs:
            if d.get("kind") == "CSIDriver":
                return d
        raise ChartError("no CSIDriver in the rendered chart")


def render(
    values: dict[str, Any],
    work: Path,
    *,
    release: str = "composefs-csi",
    namespace: str = "composefs-csi",
    chart: Path = CHART,
) -> Rendered:
    values_file = work / f"values-{release}-{len(list(work.glob('values-*')))}.yaml"
    values_file.write_text(yaml.safe_dump(values))
    args = [str(renderer()), "--name", release, "--namespace", namespace, "-f", str(values_file)]
    proc = subprocess.run(
        [*args, str(chart)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise ChartError(f"chart-render failed: {(proc.stderr or proc.stdout).strip()}")
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (work / f"{values_file.stem}.rendered.yaml").write_text(proc.stdout)
    return Rendered(docs, release, namespace)
