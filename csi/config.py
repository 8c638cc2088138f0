"""The driver's configuration file (YAML), shared by the node plugin, data plane and controller.

Example (every key optional except ``repositories``)::

    repositories:                       # the only places images come from; pods pick by name
      - name: models
        urls: ["https://cdn.example.com/models/", "https://mirror.example.com/models/"]
        auth: {type: bearer, token_file: /etc/composefs-csi/secrets/models/token}
        ca_bundle: /etc/composefs-csi/ca/models.pem
        allow_plain_http: false
    default_repository: models          # used when a volume names none (default: the first)
    store:
      path: /var/lib/composefs-csi/store
      size_cap: 50Gi                    # bytes, or a Kubernetes quantity; absent: no cap
      high_watermark: 0.9               # GC starts above this fraction of the cap...
      low_watermark: 0.8                # ...and frees down to this one
    fetch:                              # defaults for every repository (a repository may override)
      concurrency: 16
      processes: 4                      # worker processes for big eager fetches (0: none;
                                        # absent: 2 per CPU, at most 8)
      timeouts: {connect: 10, read: 30, total: 600}
      retries: {max_attempts: 5, base_backoff: 0.2, max_backoff: 10}
      rpc_wait: 100                     # seconds a publish waits before answering "retry later"
    dataplane:
      mountpoint: /var/lib/composefs-csi/mnt
      socket: /run/composefs-csi/dataplane.sock
      metrics_address: ":9810"
      read_ahead_kb: 16384              # KiB the kernel reads ahead within a file
      open_files: 1024
      readahead_files: 64               # files read ahead of a reader going file by file (0: off)
      mount_options: [ro, nosuid, nodev, allow_other]   # of the node-wide FUSE mount
    metrics:
      address: ":9809"                  # node plugin / controller metrics ("" disables)
    node:
      kubelet_dir: /var/lib/kubelet     # the node plugin mounts only under it
      repair_interval: 2                # seconds between checks of published mounts (0: off)
    controller:
      enabled: true                     # a controller serves this driver (both processes then
                                        # report CONTROLLER_SERVICE in their capabilities)

Unknown keys are errors, so a typo fails at start-up with a message naming the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from csi.fetch.config import RepositoryConfig
from csi.fetch.errors import ConfigError as RepositoryConfigError


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what is wrong."""


_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?\s*$")
_UNITS = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
}


def parse_size(value: object, key: str) -> int:
    """Bytes from an integer or a Kubernetes-style quantity (``50Gi``, ``500M``)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: size must not be negative")
        return value
    if isinstance(value, str):
        m = _QUANTITY.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2)])
    raise ConfigError(f"{key}: expected a size such as 10737418240 or 10Gi, got {value!r}")


@dataclass(frozen=True)
class StoreConfig:
    path: Path = Path("/var/lib/composefs-csi/store")
    size_cap: int | None = None
    high_watermark: float = 0.9
    low_watermark: float = 0.8


@dataclass(frozen=True)
class DataPlaneConfig:
    mountpoint: Path = Path("/var/lib/composefs-csi/mnt")
    socket: Path = Path("/run/composefs-csi/dataplane.sock")
    metrics_address: str = ":9810"
    read_ahead_kb: int = 16384
    open_files: int = 1024
    #: When a directory's files are read in turn, up to this many of the next small files are
    #: read ahead into the page cache (csi/fuse/readahead.py); 0 turns it off.
    readahead_files: int = 64
    mount_options: tuple[str, ...] = ("ro", "nosuid", "nodev", "allow_other")


@dataclass(frozen=True)
class NodeConfig:
    #: kubelet's root directory: targets and staging paths must lie under it.
    kubelet_dir: Path = Path("/var/lib/kubelet")
    #: Seconds between checks of the published volumes' mounts (0: no automatic repair).
    repair_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class DriverConfig:
    repositories: dict[str, RepositoryConfig]
    default_repository: str
    store: StoreConfig = field(default_factory=StoreConfig)
    dataplane: DataPlaneConfig = field(default_factory=DataPlaneConfig)
    metrics_address: str = ":9809"
    rpc_wait: float = 100.0
    fetch_concurrency: int = 16
    node: NodeConfig = field(default_factory=NodeConfig)
    #: A controller is deployed for this driver: the plugin's capabilities include
    #: CONTROLLER_SERVICE, whichever of its processes is asked.
    controller_enabled: bool = True

    def repository(self, name: str | None) -> RepositoryConfig:
        """The repository a volume asks for by name (None: the default). KeyError if unknown."""
        return self.repositories[name or self.default_repository]


def _take(d: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")


def _mapping(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _number(value: object, where: str, *, lo: float, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{where}: must be {bound}, got {value}")
    return float(value)


def config_from_dict(raw: object) -> DriverConfig:
    """Validate a parsed configuration document and build the typed configuration."""
    top = _mapping(raw, "configuration")
    _take(
        top,
        {
            "repositories",
            "default_repository",
            "store",
            "fetch",
            "dataplane",
            "metrics",
            "node",
            "controller",
        },
        "configuration",
    )
    fetch = _mapping(top.get("fetch"), "fetch")
    _take(fetch, {"concurrency", "processes", "timeouts", "retries", "rpc_wait"}, "fetch")
    rpc_wait = _number(fetch.pop("rpc_wait", 100.0), "fetch.rpc_wait", lo=1)

    repos_raw = top.get("repositories")
    if not isinstance(repos_raw, list) or not repos_raw:
        raise ConfigError("repositories: at least one repository must be configured")
    repositories: dict[str, RepositoryConfig] = {}
    for i, item in enumerate(repos_raw):
        entry = _mapping(item, f"repositories[{i}]")
        merged = {**fetch, **entry}
        for key in ("timeouts", "retries"):
            if key in fetch and key in entry:
                merged[key] = {**fetch[key], **entry[key]}
        try:
            repo = RepositoryConfig.from_dict(merged)
        except (RepositoryConfigError, TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"repositories[{i}]: {e}") from None
        if repo.name in repositories:
            raise ConfigError(f"repositories[{i}]: duplicate name {repo.name!r}")
        repositories[repo.name] = repo
    default = top.get("default_repository") or next(iter(repositories))
    if default not in repositories:
        raise ConfigError(f"default_repository: {default!r} is not a configured repository")

    store_d = _mapping(top.get("store"), "store")
    _take(store_d, {"path", "size_cap", "high_watermark", "low_watermark"}, "store")
    cap = store_d.get("size_cap")
    store = StoreConfig(
        path=Path(store_d.get("path", StoreConfig.path)),
        size_cap=None if cap in (None, 0, "") else parse_size(cap, "store.size_cap"),
        high_watermark=_number(
            store_d.get("high_watermark", 0.9), "store.high_watermark", lo=0.01, hi=1
        ),
        low_watermark=_number(store_d.get("low_watermark", 0.8), "store.low_watermark", lo=0, hi=1),
    )
    if store.low_watermark >= store.high_watermark:
        raise ConfigError("store: low_watermark must be below high_watermark")

    dp = _mapping(top.get("dataplane"), "dataplane")
    _take(
        dp,
        {
            "mountpoint",
            "socket",
            "metrics_address",
            "read_ahead_kb",
            "open_files",
            "readahead_files",
            "mount_options",
        },
        "dataplane",
    )
    options = dp.get("mount_options", list(DataPlaneConfig.mount_options))
    if not isinstance(options, list) or not all(isinstance(o, str) and o for o in options):
        raise ConfigError("dataplane.mount_options: expected a list of option strings")
    if "rw" in options:
        raise ConfigError("dataplane.mount_options: the data plane is read-only; drop 'rw'")
    dataplane = DataPlaneConfig(
        mountpoint=Path(dp.get("mountpoint", DataPlaneConfig.mountpoint)),
        socket=Path(dp.get("socket", DataPlaneConfig.socket)),
        metrics_address=str(dp.get("metrics_address", DataPlaneConfig.metrics_address)),
        read_ahead_kb=int(
            _number(
                dp.get("read_ahead_kb", DataPlaneConfig.read_ahead_kb),
                "dataplane.read_ahead_kb",
                lo=0,
            )
        ),
        open_files=int(_number(dp.get("open_files", 1024), "dataplane.open_files", lo=16)),
        readahead_files=int(
            _number(dp.get("readahead_files", 64), "dataplane.readahead_files", lo=0, hi=256)
        ),
        mount_options=tuple(options),
    )
    metrics = _mapping(top.get("metrics"), "metrics")
    _take(metrics, {"address"}, "metrics")
    node_d = _mapping(top.get("node"), "node")
    _take(node_d, {"kubelet_dir", "repair_interval"}, "node")
    repair_interval = _number(node_d.get("repair_interval", 2.0), "node.repair_interval", lo=0)
    kubelet_dir = str(node_d.get("kubelet_dir", NodeConfig.kubelet_dir))
    if not kubelet_dir.startswith("/") or kubelet_dir.rstrip("/") == "":
        raise ConfigError(f"node.kubelet_dir: expected an absolute directory, got {kubelet_dir!r}")
    controller_d = _mapping(top.get("controller"), "controller")
    _take(controller_d, {"enabled"}, "controller")
    enabled = controller_d.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"controller.enabled: expected true or false, got {enabled!r}")
    return DriverConfig(
        repositories=repositories,
        default_repository=default,
        store=store,
        dataplane=dataplane,
        metrics_address=str(metrics.get("address", ":9809")),
        rpc_wait=rpc_wait,
        fetch_concurrency=int(fetch.get("concurrency", 16)),
        node=NodeConfig(kubelet_dir=Path(kubelet_dir), repair_interval=repair_interval),
        controller_enabled=enabled,
    )


def load_config(path: str | Path) -> DriverConfig:
    """Read and validate a configuration file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {str(path)!r}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"configuration file {str(path)!r} is not valid YAML: {e}") from None
    return config_from_dict(raw)
