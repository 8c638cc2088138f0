"""Requests as they may be logged: secrets removed.

Drops every field the spec marks as secret (all ``secrets`` maps) and kubelet's service account
tokens (``csi.storage.k8s.io/serviceAccount.tokens`` in ``volume_context``), at any depth.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from .attributes import SA_TOKENS

SECRET_FIELDS = frozenset({"secrets"})
SECRET_KEYS = frozenset({SA_TOKENS})
STRIPPED = "***stripped***"


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in SECRET_FIELDS:
                out[k] = STRIPPED if v else {}
            elif k in SECRET_KEYS:
                out[k] = STRIPPED
            else:
                out[k] = _strip(v)
        return out
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def redacted(message: Message) -> dict[str, Any]:
    """The message as a plain dict, with secrets replaced by a marker."""
    return dict(_strip(MessageToDict(message, preserving_proto_field_name=True)))
