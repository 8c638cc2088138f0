"""``composefs-csi pull REF --repository URL --store DIR [--concurrency N]`` as a function."""

from __future__ import annotations

from pathlib import Path

from csi.store import Store

from .client import FetchResult, RepositoryClient
from .config import Auth, RepositoryConfig
from .progress import FetchProgress, Listener


def pull(
    ref: str,
    repository: str | list[str],
    store_dir: Path,
    *,
    concurrency: int = 16,
    processes: int | None = None,
    on_progress: Listener | None = None,
    name: str = "default",
    allow_plain_http: bool = False,
    auth: Auth | None = None,
    ca_bundle: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> FetchResult:
    """Fetch ``ref`` from the repository at ``repository`` (a URL, a path, or a list of mirrors)
    into the store at ``store_dir`` (created if needed).

    ``on_progress`` is called with a :class:`~csi.fetch.progress.ProgressSnapshot` after every
    change, from worker threads. ``name`` is the repository name recorded with the ref in the
    store. ``processes``: worker processes for many objects (None: automatic, 0: none).
    Raises :class:`~csi.fetch.errors.FetchError` (its ``str`` is the message for users).
    """
    urls = tuple([repository] if isinstance(repository, str) else repository)
    config = RepositoryConfig(
        name=name,
        urls=urls,
        auth=auth,
        ca_bundle=ca_bundle,
        client_cert=client_cert,
        client_key=client_key,
        allow_plain_http=allow_plain_http,
        concurrency=concurrency,
        processes=processes,
    )
    with Store(Path(store_dir)) as store, RepositoryClient(config) as client:
        # A progress bar needs a few updates a second, not one per object.
        return client.fetch_image(ref, store, FetchProgress(on_progress, min_interval=0.05))
