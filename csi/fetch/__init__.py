"""Repository clients (HTTP(S), file): resolve refs, fetch images and objects into a store.

Typical use (node server: one client per configured repository, kept open)::

    client = RepositoryClient(RepositoryConfig(name="models", urls=("https://repo.example/",)))
    result = client.fetch_image("llama-3-8b:v2", store, progress=FetchProgress())

Errors are :class:`FetchError` subclasses whose ``code`` names the gRPC status to answer with.
"""

from .client import FetchResult, RepositoryClient, fetch_image, resolve
from .config import BasicAuth, BearerAuth, RepositoryConfig, RetryPolicy, Timeouts
from .errors import (
    AccessDenied,
    BadResponse,
    ConfigError,
    Corrupt,
    FetchError,
    InvalidReference,
    NoSpace,
    NotFound,
    TimedOut,
    Unreachable,
)
from .progress import FetchProgress, ProgressSnapshot
from .pull import pull
from .refs import parse_digest, validate_ref_name

__all__ = [
    "AccessDenied",
    "BadResponse",
    "BasicAuth",
    "BearerAuth",
    "ConfigError",
    "Corrupt",
    "FetchError",
    "FetchProgress",
    "FetchResult",
    "InvalidReference",
    "NoSpace",
    "NotFound",
    "ProgressSnapshot",
    "RepositoryClient",
    "RepositoryConfig",
    "RetryPolicy",
    "TimedOut",
    "Timeouts",
    "Unreachable",
    "fetch_image",
    "parse_digest",
    "pull",
    "resolve",
    "validate_ref_name",
]
