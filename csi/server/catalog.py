"""The controller's view of the repositories: resolve refs, and measure images (fetching the
image's metadata only into a local cache store, never its objects)."""

from __future__ import annotations

from collections.abc import Mapping

from csi.fetch.config import RepositoryConfig
from csi.store import Store

from .fetcher import RepositoryFetcher
from .imageinfo import ImageSize, SizeCache


class RepositoryCatalog:
    def __init__(self, repositories: Mapping[str, RepositoryConfig], store: Store) -> None:
        self.store = store
        self.fetcher = RepositoryFetcher(repositories, store)
        self.sizes = SizeCache()

    def close(self) -> None:
        self.fetcher.close()

    def resolve(self, repository: str, ref: str) -> bytes:
        return self.fetcher.resolve(repository, ref)

    def image_size(self, repository: str, image: bytes) -> ImageSize:
        if not self.store.has_image(image):
            self.fetcher.client(repository).fetch_image(
                "sha256:" + image.hex(), self.store, objects=False
            )
        return self.sizes.get(image, self.store.image_path(image))
