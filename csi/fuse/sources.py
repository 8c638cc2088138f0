"""Object sources for lazy views, backed by the repository clients of :mod:`csi.fetch`."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

from csi.fetch import RepositoryClient, RepositoryConfig
from csi.store import Store

from .objects import ObjectSource


def repository_config(name: str, spec: str | RepositoryConfig) -> RepositoryConfig:
    """A repository configuration from a URL (or local path), or the configuration itself.

    A bare URL gets the defaults, so a plain ``http://`` one is refused: configure a
    :class:`RepositoryConfig` with ``allow_plain_http`` to use one.
    """
    if isinstance(spec, RepositoryConfig):
        return spec
    return RepositoryConfig(name=name, urls=(spec,))


class StoreHandle:
    """Opens the node store on first use (only lazy views need it) and closes it at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._store: Store | None = None
        self._mu = threading.Lock()

    def get(self) -> Store:
        with self._mu:
            if self._store is None:
                self._store = Store(self.root)
            return self._store

    def close(self) -> None:
        with self._mu:
            if self._store is not None:
                self._store.close()
                self._store = None


class RepositoryObjectSource:
    """Fetches single objects from one repository into the store (verified, single-flight)."""

    def __init__(self, client: RepositoryClient, store: StoreHandle) -> None:
        self.client = client
        self.store = store

    def fetch(self, digest: bytes, size: int) -> None:
        self.client.fetch_objects(self.store.get(), {digest: size})


class SourceRegistry:
    """One object source per configured repository, created on first use."""

    def __init__(
        self,
        repositories: Mapping[str, str | RepositoryConfig],
        store: StoreHandle,
        default: str | None = None,
    ) -> None:
        self._specs = dict(repositories)
        self._store = store
        self.default = default if default is not None else next(iter(self._specs), None)
        self._clients: dict[str, RepositoryClient] = {}
        self._sources: dict[str, ObjectSource] = {}

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str | None) -> ObjectSource:
        key = name or self.default
        if key is None or key not in self._specs:
            raise KeyError(name or "(default)")
        src = self._sources.get(key)
        if src is None:
            client = RepositoryClient(repository_config(key, self._specs[key]))
            self._clients[key] = client
            src = self._sources[key] = RepositoryObjectSource(client, self._store)
        return src

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        self._sources.clear()
