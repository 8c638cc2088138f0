"""SOURCE arguments in skopeo's transport syntax.

- ``docker://[HOST[:PORT]/]NAME[:TAG][@DIGEST]``: a registry (Docker Hub when no host is
  given, ``library/`` added to one-component names; ``latest`` when neither tag nor digest);
- ``oci:DIR[:TAG]``: an OCI image layout directory (split at the first ``:``, as skopeo does);
- ``docker-archive:FILE[:NAME:TAG | :@INDEX]``: a ``docker save`` tarball.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .digests import Digest, parse_digest
from .errors import FormatError, SourceSyntaxError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.?)+(?::[0-9]{1,5})?|\[[0-9a-fA-F:]+\](?::[0-9]{1,5})?"
)


@dataclass(frozen=True)
class DockerRef:
    registry: str  # as named (docker.io for Docker Hub), host[:port]
    repository: str
    tag: str | None
    digest: Digest | None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        return str(self.digest) if self.digest else (self.tag or "latest")

    def __str__(self) -> str:
        s = f"docker://{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


@dataclass(frozen=True)
class LayoutRef:
    path: str
    tag: str | None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class ArchiveRef:
    path: str
    ref: str | None  # "name:tag" or "@N"

    def __str__(self) -> str:
        return f"docker-archive:{self.path}" + (f":{self.ref}" if self.ref else "")


SourceRef = DockerRef | LayoutRef | ArchiveRef


def parse_source(text: str) -> SourceRef:
    transport, sep, rest = text.partition(":")
    if not sep:
        raise SourceSyntaxError(
            f"SOURCE {text!r}: expected docker://NAME[:TAG], oci:DIR[:TAG] or docker-archive:FILE"
        )
    if transport == "docker":
        if not rest.startswith("//"):
            raise SourceSyntaxError(f"SOURCE {text!r}: expected docker://HOST/NAME[:TAG]")
        return parse_docker(rest[2:])
    if transport == "oci":
        path, _, tag = rest.partition(":")
        if not path:
            raise SourceSyntaxError(f"SOURCE {text!r}: oci: needs a directory")
        if tag and not _TAG.fullmatch(tag):
            raise SourceSyntaxError(f"SOURCE {text!r}: {tag!r} is not a valid tag")
        return LayoutRef(path, tag or None)
    if transport == "docker-archive":
        path, _, ref = rest.partition(":")
        if not path:
            raise SourceSyntaxError(f"SOURCE {text!r}: docker-archive: needs a file")
        return ArchiveRef(path, ref or None)
    raise SourceSyntaxError(
        f"SOURCE {text!r}: unknown transport {transport!r} "
        "(supported: docker://, oci:, docker-archive:)"
    )


def parse_docker(text: str) -> DockerRef:
    """``[HOST[:PORT]/]NAME[:TAG][@DIGEST]`` (the part after ``docker://``)."""
    name, at, digest_text = text.partition("@")
    digest: Digest | None = None
    if at:
        try:
            digest = parse_digest(digest_text, "reference digest")
        except FormatError as e:
            raise SourceSyntaxError(f"docker://{text}: {e}") from None
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
        if not _HOST.fullmatch(registry):
            raise SourceSyntaxError(f"docker://{text}: {registry!r} is not a valid host")
    else:
        registry, path = DOCKER_HUB, name
    tag: str | None = None
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        path, tag = path[:colon], path[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise SourceSyntaxError(f"docker://{text}: {tag!r} is not a valid tag")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not path or not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
        raise SourceSyntaxError(
            f"docker://{text}: {path!r} is not a valid repository name "
            "(lower-case letters, digits and . _ - separators)"
        )
    if tag is None and digest is None:
        tag = "latest"
    return DockerRef(registry, path, tag, digest)
