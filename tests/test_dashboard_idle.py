"""Every query of the Grafana dashboard shows a value for an idle driver (issue 11: panels that
said "No data" until their first event, because labelled counters never touched have no
series).

A real Prometheus (Debian's ``prometheus``) scrapes the driver's three real processes (the
CLI's ``dataplane``, ``node`` and ``controller``, with no volume published), with the labels
the chart's ServiceMonitor adds (``namespace``, ``container``); then each query of
``charts/composefs-csi/dashboards/composefs-csi.json`` is evaluated through its HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._serverkit import REPO_ROOT, driver_config, fuse_problem, make_repo

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

DASHBOARD = REPO_ROOT / "charts" / "composefs-csi" / "dashboards" / "composefs-csi.json"
PROMETHEUS = shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_queries() -> list[str]:
    out: list[str] = []

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            if isinstance(o.get("expr"), str):
                out.append(o["expr"])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(json.loads(DASHBOARD.read_text()))
    return out


@contextlib.contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _query(port: int, expr: str) -> list[Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_every_dashboard_query_has_a_value_on_an_idle_driver(tmp_path: Path) -> None:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (scripts/setup.sh installs it)")
    problem = fuse_problem()
    if problem:
        pytest.skip(problem)
    make_repo(tmp_path, 1, n=5)
    work = tmp_path / "node"
    ports = {"plugin": _free_port(), "dataplane": _free_port(), "controller": _free_port()}
    extra = {"dataplane": {"metrics_address": f"127.0.0.1:{ports['dataplane']}"}}
    _, node_cfg = driver_config(work, {"local": str(tmp_path / "repo")}, extra=extra)
    raw = json.loads(node_cfg.read_text())
    raw["dataplane"].update(
        mountpoint=str(work / "mnt"),
        socket=str(work / "dataplane.sock"),
        metrics_address=f"127.0.0.1:{ports['dataplane']}",
    )
    raw["metrics"] = {"address": f"127.0.0.1:{ports['plugin']}"}
    node_cfg.write_text(json.dumps(raw))
    ctrl_cfg = work / "controller.json"
    ctrl_cfg.write_text(
        json.dumps({**raw, "metrics": {"address": f"127.0.0.1:{ports['controller']}"}})
    )
    prom_port = _free_port()
    jobs = [
        {
            "job_name": name,
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{port}"],
                    "labels": {"namespace": "composefs-csi", "container": name},
                }
            ],
        }
        for name, port in ports.items()
    ]
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))
    cli = [sys.executable, "-m", "csi.cli.main"]
    with (
        process([*cli, "dataplane", "--config", str(node_cfg)], work / "dataplane.log"),
        process(
            [
                *cli,
                "node",
                "--config",
                str(node_cfg),
                "--endpoint",
                f"unix://{work}/node.sock",
                "--node-id",
                "node-1",
            ],
            work / "node.log",
        ),
        process(
            [
                *cli,
                "controller",
                "--config",
                str(ctrl_cfg),
                "--endpoint",
                f"unix://{work}/controller.sock",
            ],
            work / "controller.log",
        ),
        process(
            [
                PROMETHEUS,
                f"--config.file={prom_cfg}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            tmp_path / "prometheus.log",
        ),
    ):
        deadline = time.monotonic() + 90
        while True:  # every target scraped, and enough samples for rate() over 15 s
            with contextlib.suppress(OSError, AssertionError):
                ups = _query(prom_port, 'count_over_time(up{namespace="composefs-csi"}[15s])')
                if len(ups) == 3 and all(float(u["value"][1]) >= 4 for u in ups):
                    healthy = _query(prom_port, "up == 1")
                    if len(healthy) == 3:
                        break
            assert time.monotonic() < deadline, "prometheus never scraped the three processes"
            time.sleep(0.5)
        empty = []
        for q in dashboard_queries():
            expr = q.replace("$namespace", "composefs-csi").replace("$__rate_interval", "15s")
            result = _query(prom_port, expr)
            # No series ("No data"), or only NaN (a quantile of nothing): no value to show.
            if all(r["value"][1] == "NaN" for r in result):
                empty.append(q)
    assert not empty, "queries with no data on an idle driver:\n" + "\n".join(empty)
