"""Names and paths of the repository layout (BRIEF §2.1, composefs-rs compatible).

::

    meta.json                 {"version": 1, "algorithm": "fsverity-sha256-12", ...}
    objects/XX/<62 hex>       every object, named by its fs-verity SHA-256 digest
    images/<64 hex>           a composefs image: symlink to ../objects/XX/<62 hex>
    images/refs/<name...>     a mutable name: symlink to ../<64 hex> (one more ../ per level)
"""

from __future__ import annotations

import re

from .errors import InvalidDigest, InvalidRefName

DIGEST_SIZE = 32
HEX_LEN = 2 * DIGEST_SIZE
ALGORITHM = "fsverity-sha256-12"
FORMAT_VERSION = 1

META_FILE = "meta.json"
OBJECTS_DIR = "objects"
IMAGES_DIR = "images"
REFS_DIR = "refs"  # inside images/
TMP_DIR = ".tmp"

#: Longest ref name accepted (bytes, whole path) and longest single component.
REF_MAX = 1024
REF_COMPONENT_MAX = 255

_HEX_RE = re.compile(r"[0-9a-f]{64}")
_SHORT_HEX_RE = re.compile(r"[0-9a-f]{2}")
_REST_HEX_RE = re.compile(r"[0-9a-f]{62}")


def check_digest(digest: bytes) -> bytes:
    """Return ``digest`` if it is 32 bytes, else raise :class:`InvalidDigest`."""
    if type(digest) is bytes and len(digest) == DIGEST_SIZE:
        return digest  # the common case, asked several times per object: no copy
    if not isinstance(digest, bytes | bytearray) or len(digest) != DIGEST_SIZE:
        raise InvalidDigest(f"a digest must be {DIGEST_SIZE} bytes, got {digest!r:.80}")
    return bytes(digest)


def is_hex_digest(text: str) -> bool:
    """True for exactly 64 lowercase hex characters."""
    return _HEX_RE.fullmatch(text) is not None


def parse_hex_digest(text: str) -> bytes:
    """``<64 hex>`` or ``sha256:<64 hex>`` -> 32 bytes (upper case accepted)."""
    t = text[len("sha256:") :] if text.startswith("sha256:") else text
    t = t.lower()
    if not is_hex_digest(t):
        raise InvalidDigest(f"not a SHA-256 digest (64 hex characters): {text!r:.100}")
    return bytes.fromhex(t)


def object_relpath(digest: bytes) -> str:
    """``objects/XX/<62 hex>`` relative to the repository root."""
    h = check_digest(digest).hex()
    return f"{OBJECTS_DIR}/{h[:2]}/{h[2:]}"


def image_link_target(digest: bytes) -> str:
    """What ``images/<64 hex>`` points at: ``../objects/XX/<62 hex>``."""
    return "../" + object_relpath(digest)


def ref_link_target(name: str, digest: bytes) -> str:
    """What ``images/refs/<name>`` points at: ``../<64 hex>``, one more ``../`` per level."""
    depth = name.count("/")
    return "../" * (depth + 1) + check_digest(digest).hex()


def is_object_name(prefix: str, rest: str) -> bool:
    """True if ``objects/<prefix>/<rest>`` is a well-formed object file name."""
    return _SHORT_HEX_RE.fullmatch(prefix) is not None and _REST_HEX_RE.fullmatch(rest) is not None


def validate_ref_name(name: str) -> str:
    """Check a ref name; return it unchanged or raise :class:`InvalidRefName`.

    Components are separated by ``/``. Rejected: empty names or components, ``.`` and
    ``..``, a leading ``/``, control and whitespace characters, backslashes, and names
    longer than :data:`REF_MAX` bytes (:data:`REF_COMPONENT_MAX` per component).
    """
    if not isinstance(name, str) or not name:
        raise InvalidRefName("a ref name must be a non-empty string")
    shown = repr(name[:100])
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRefName(f"ref name {shown} is not valid UTF-8") from e
    if len(encoded) > REF_MAX:
        raise InvalidRefName(f"ref name {shown}... is longer than {REF_MAX} bytes")
    if name.startswith("/"):
        raise InvalidRefName(f"ref name {shown} must not be absolute")
    for ch in name:
        if not ch.isprintable() or ch.isspace() or ch == "\\":
            raise InvalidRefName(f"ref name {shown} contains a forbidden character {ch!r}")
    for comp in name.split("/"):
        if comp in ("", ".", ".."):
            raise InvalidRefName(f"ref name {shown} has an empty, '.' or '..' component")
        if len(comp.encode("utf-8")) > REF_COMPONENT_MAX:
            raise InvalidRefName(
                f"ref name {shown} has a component longer than {REF_COMPONENT_MAX} bytes"
            )
    return name
