"""References as pods give them: ``sha256:<64 hex>``, a bare ``<64 hex>``, or a ref name.

Ref names come from pods, so they are held to a narrow grammar before they are put into a URL or
a path: components of ``[A-Za-z0-9._:@+=-]`` separated by single ``/``, no ``.`` or ``..``
component, no leading ``/``, at most :data:`REF_MAX` characters and :data:`REF_DEPTH_MAX`
components.
"""

from __future__ import annotations

import re

from .errors import InvalidReference
from .quoting import quote

REF_MAX = 255
REF_DEPTH_MAX = 8
_COMPONENT = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")
_HEX = re.compile(r"[0-9a-f]{64}")
_LINK = re.compile(r"((?:\.\./)+)([0-9a-f]{64})")


def parse_digest(ref: str) -> bytes | None:
    """The digest if ``ref`` is a digest reference, ``None`` if it is a ref name.

    Raises :class:`InvalidReference` for ``sha256:`` followed by anything but 64 hex.
    """
    if ref.startswith("sha256:"):
        hex_part = ref[7:].lower()
        if not _HEX.fullmatch(hex_part):
            raise InvalidReference(f"{ref[:80]!r} is not sha256: followed by 64 hex digits")
        return bytes.fromhex(hex_part)
    if _HEX.fullmatch(ref):
        return bytes.fromhex(ref)
    return None


def validate_ref_name(name: str) -> str:
    """Return ``name`` if it is an acceptable ref name, else raise :class:`InvalidReference`."""
    shown = repr(name[:80])
    if not isinstance(name, str) or not name:
        raise InvalidReference("a ref name must be a non-empty string")
    if len(name) > REF_MAX:
        raise InvalidReference(f"ref name {shown}... is longer than {REF_MAX} characters")
    comps = name.split("/")
    if len(comps) > REF_DEPTH_MAX:
        raise InvalidReference(f"ref name {shown} has more than {REF_DEPTH_MAX} components")
    for c in comps:
        if c in (".", "..") or not _COMPONENT.fullmatch(c):
            raise InvalidReference(
                f"ref name {shown} is not allowed: components of letters, digits and ._:@+=- "
                "separated by single '/', none of them '.' or '..'"
            )
    return name


def parse_ref_target(name: str, target: str) -> bytes:
    """The image digest a ref symlink target designates: exactly ``../`` once per level of the
    ref name, then 64 lower-case hex digits (surrounding whitespace tolerated). Anything else
    raises :class:`ValueError` with a short reason."""
    text = target.strip()
    m = _LINK.fullmatch(text)
    if m is None:
        raise ValueError(f"symlink target {quote(text)} is not ../<64 hex>")
    depth = name.count("/") + 1
    if len(m.group(1)) != 3 * depth:
        raise ValueError(
            f"symlink target {quote(text)} does not point into images/ from refs/{name}"
        )
    return bytes.fromhex(m.group(2))
