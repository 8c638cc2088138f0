"""One interceptor for every CSI call: turns exceptions into statuses, logs, counts.

Logged per call: the method, the status code and the duration at INFO (``Probe`` at DEBUG),
the redacted request at DEBUG, and the message of every error at WARNING (INTERNAL with the
traceback). ``details`` of a status is always empty, as the spec requires.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from . import metrics as m
from .errors import CsiError, to_csi_error
from .redact import redacted

log = logging.getLogger("csi.server.grpc")

_QUIET = frozenset({"Probe", "NodeGetCapabilities", "GetPluginInfo", "NodeGetVolumeStats"})


def _wrap(method: str, fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    short = method.rsplit("/", 1)[-1]

    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.monotonic()
        code = grpc.StatusCode.OK
        message = ""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s request %s", short, redacted(request))
        try:
            return fn(request, context)
        except CsiError as e:
            code, message = e.code, e.message
        except Exception as e:
            err = to_csi_error(e)
            code, message = err.code, err.message
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", short)
        finally:
            elapsed = time.monotonic() - t0
            m.GRPC_REQUESTS.labels(short, code.name).inc()
            m.GRPC_DURATION.labels(short).observe(elapsed)
            level = (
                logging.DEBUG if short in _QUIET and code == grpc.StatusCode.OK else logging.INFO
            )
            log.log(level, "%s %s %.1fms", short, code.name, elapsed * 1000)
            if code != grpc.StatusCode.OK:
                log.warning("%s -> %s: %s", short, code.name, message)
        context.abort(code, message)

    return handler


class CsiInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _wrap(handler_call_details.method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
