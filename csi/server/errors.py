"""Errors that carry their gRPC status code, and the mapping of the lower layers' errors.

Handlers raise :class:`CsiError` (or let a store/fetch error escape); the interceptor in
:mod:`csi.server.interceptor` turns every exception into a status with an empty ``details``
(spec "Error Scheme"). Mapping of the layers below (documented in docs/csi-server.md):

=====================================  ==========================================================
error                                  code
=====================================  ==========================================================
fetch ``InvalidReference``             INVALID_ARGUMENT (the pod gave a malformed ref)
fetch ``NotFound``                     NOT_FOUND (no such ref / image / object in the repository)
fetch ``AccessDenied``                 PERMISSION_DENIED (the repository refused our credentials)
fetch ``Unreachable``, ``BadResponse`` UNAVAILABLE (retryable)
fetch ``TimedOut``                     DEADLINE_EXCEEDED (retryable)
fetch ``Corrupt``                      DATA_LOSS (every mirror served bytes that do not verify)
fetch ``NoSpace``, store ``StoreFull`` RESOURCE_EXHAUSTED
fetch ``ConfigError``                  FAILED_PRECONDITION (the admin's repository config)
store ``ImageRejected``                DATA_LOSS
anything else                          INTERNAL
=====================================  ==========================================================
"""

from __future__ import annotations

import grpc

from csi.fetch.errors import FetchError
from csi.store.errors import ImageRejected, StoreError, StoreFull


class CsiError(Exception):
    """An RPC failure with its status code; ``str()`` is the status message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def missing(field: str) -> CsiError:
    """The spec's INVALID_ARGUMENT for a required field left empty."""
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, f"{field} missing in request")


def not_found(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.NOT_FOUND, message)


def already_exists(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.ALREADY_EXISTS, message)


def precondition(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.FAILED_PRECONDITION, message)


def aborted(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.ABORTED, message)


def internal(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INTERNAL, message)


_FETCH_CODES = {name: getattr(grpc.StatusCode, name) for name in grpc.StatusCode.__members__}


def to_csi_error(e: BaseException) -> CsiError:
    """The status an exception from any layer is answered with."""
    if isinstance(e, CsiError):
        return e
    if isinstance(e, NotImplementedError):  # the generated servicers' default methods
        return CsiError(grpc.StatusCode.UNIMPLEMENTED, "not implemented by this plugin")
    if isinstance(e, FetchError):
        code = _FETCH_CODES.get(e.code, grpc.StatusCode.INTERNAL)
        return CsiError(code, str(e))
    if isinstance(e, StoreFull):
        return CsiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    if isinstance(e, ImageRejected):
        return CsiError(grpc.StatusCode.DATA_LOSS, str(e))
    if isinstance(e, StoreError):
        return CsiError(grpc.StatusCode.INTERNAL, f"store: {e}")
    if isinstance(e, OSError):
        return CsiError(grpc.StatusCode.INTERNAL, f"{e.__class__.__name__}: {e}")
    return CsiError(grpc.StatusCode.INTERNAL, f"internal error: {e.__class__.__name__}: {e}")
