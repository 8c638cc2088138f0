"""Platforms (``os/arch[/variant]``): the host's, parsing ``--platform``, choosing from an index.

Names are normalised as the container tools do (``x86_64`` is ``amd64``, ``aarch64`` is
``arm64``, whose variant ``v8`` is its default; ``arm`` defaults to ``v7``). A platform asked
for without a variant matches any variant of that architecture, preferring the default one.
"""

from __future__ import annotations

import platform as _platform

from .errors import PlatformError, SourceSyntaxError
from .manifest import Descriptor, Index, Platform

_ARCH_ALIASES = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


def normalize(p: Platform, *, keep_default_variant: bool = False) -> Platform:
    arch, variant = p.architecture.lower(), p.variant.lower()
    if arch in _ARCH_ALIASES:
        arch, alias_variant = _ARCH_ALIASES[arch]
        variant = variant or alias_variant
    if variant and _DEFAULT_VARIANT.get(arch) == variant and not keep_default_variant:
        variant = ""
    return Platform(p.os.lower(), arch, variant)


def host_platform() -> Platform:
    return normalize(Platform("linux", _platform.machine() or "amd64"))


def parse_platform(text: str) -> Platform:
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise SourceSyntaxError(
            f"--platform {text!r}: expected OS/ARCH or OS/ARCH/VARIANT, e.g. linux/arm64"
        )
    # A variant given explicitly must match (the default one included).
    return normalize(Platform(*parts), keep_default_variant=True)


def _variant_of(p: Platform) -> str:
    return p.variant or _DEFAULT_VARIANT.get(p.architecture, "")


def matches(have: Platform, want: Platform, *, strict_variant: bool) -> bool:
    h = normalize(have)
    if h.os != want.os or h.architecture != want.architecture:
        return False
    return not strict_variant or _variant_of(h) == _variant_of(want)


def select(index: Index, want: Platform, what: str) -> Descriptor:
    """The manifest of ``index`` for ``want``; :class:`PlatformError` listing what there is."""
    with_platform = [d for d in index.manifests if d.platform is not None]
    if not with_platform and len(index.manifests) == 1:
        return index.manifests[0]  # a single entry without a platform (an artifact index)
    exact = [
        d
        for d in with_platform
        if d.platform is not None and matches(d.platform, want, strict_variant=True)
    ]
    if exact:
        return exact[0]
    if not want.variant:
        loose = [
            d
            for d in with_platform
            if d.platform is not None and matches(d.platform, want, strict_variant=False)
        ]
        if loose:
            return loose[0]
    offered = sorted(
        {str(normalize(d.platform, keep_default_variant=True)) for d in with_platform if d.platform}
    )
    listed = ", ".join(p for p in offered if p and "unknown" not in p) or "none"
    raise PlatformError(
        f"{what}: no image for platform {want} (the index offers: {listed}); "
        "choose one with --platform"
    )
