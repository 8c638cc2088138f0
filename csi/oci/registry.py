"""Reading images from a registry (the OCI distribution API, ``/v2/``).

Manifests are fetched with an ``Accept`` of every kind we understand and checked against the
digest asked for (a pinned reference) or the ``Docker-Content-Digest`` the registry gives;
blobs are streamed (the caller checks their digest as it reads, :mod:`csi.oci.streams`).
On a 401 the challenge is answered once (:mod:`csi.oci.auth`); a second 401 means the
credentials were refused.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from . import auth
from .auth import Credentials
from .digests import Digest, check_bytes, digest_of, parse_digest
from .errors import AuthError, DigestError, FormatError, NotFoundError, RegistryError
from .httpclient import HttpClient, Response
from .manifest import ACCEPT, MANIFEST_LIMIT, Descriptor
from .reference import DockerRef
from .source import ManifestSource

_ERROR_BODY_LIMIT = 1 << 16


class RegistryClient:
    def __init__(
        self, ref: DockerRef, http: HttpClient, creds: Credentials | None, *, plain_http: bool
    ) -> None:
        self.ref = ref
        self.http = http
        self.creds = creds
        scheme = "http" if plain_http else "https"
        self._base = f"{scheme}://{ref.api_host}/v2/{ref.repository}"
        self._authorization: str | None = None
        self._scope = f"repository:{ref.repository}:pull"

    @property
    def name(self) -> str:
        return f"{self.ref.registry}/{self.ref.repository}"

    def _get(self, path: str, accept: str | None = None) -> Response:
        url = f"{self._base}/{path}"
        headers = {"Accept": accept} if accept else {}
        resp = self.http.get(url, headers, auth=self._authorization)
        if resp.status != 401:
            return resp
        challenge = resp.header("WWW-Authenticate") or ""
        resp.read_all(_ERROR_BODY_LIMIT)
        self._authorization = self._answer(challenge)
        resp = self.http.get(url, headers, auth=self._authorization)
        if resp.status == 401:
            resp.read_all(_ERROR_BODY_LIMIT)
            raise AuthError(auth.refused(self.ref.registry, self.creds))
        return resp

    def _answer(self, challenge: str) -> str:
        scheme, params = auth.parse_challenge(challenge)
        if scheme == "bearer":
            token = auth.fetch_token(self.http, params, self._scope, self.creds, self.ref.registry)
            return f"Bearer {token}"
        if scheme == "basic":
            if self.creds is None:
                raise AuthError(auth.refused(self.ref.registry, None))
            return self.creds.basic()
        raise AuthError(
            f"registry {self.ref.registry}: unsupported authentication scheme {scheme!r}"
        )

    def _fail(self, resp: Response, what: str) -> OciErrorType:
        body = b""
        with contextlib.suppress(RegistryError):
            body = resp.read_all(_ERROR_BODY_LIMIT)
        codes = _error_codes(body)
        detail = f" ({'; '.join(codes)})" if codes else ""
        if resp.status == 404:
            return NotFoundError(f"{what} not found in {self.name}{detail}")
        if resp.status == 403:
            return AuthError(f"registry {self.ref.registry}: access to {what} denied{detail}")
        return RegistryError(f"{what}: registry {self.ref.registry} answered {resp.status}{detail}")

    def manifest(self, reference: str, expected: Digest | None) -> tuple[bytes, str, Digest]:
        """A manifest by tag or digest: (bytes, content type, its digest), verified."""
        what = f"manifest {reference}"
        resp = self._get(f"manifests/{reference}", ACCEPT)
        if resp.status != 200:
            raise self._fail(resp, what)
        data = resp.read_all(MANIFEST_LIMIT)
        content_type = resp.header("Content-Type") or ""
        if expected is not None:
            check_bytes(data, expected, f"{what} from {self.name}")
            return data, content_type, expected
        actual = digest_of(data)
        header = resp.header("Docker-Content-Digest")
        if header:
            try:
                claimed = parse_digest(header.strip(), "Docker-Content-Digest")
            except FormatError:
                claimed = None
            if claimed is not None and claimed.algorithm == "sha256" and claimed != actual:
                raise DigestError(
                    f"{what} from {self.name}: content hashes to {actual}, but the registry "
                    f"says {claimed}"
                )
        return data, content_type, actual

    def open_blob(self, desc: Descriptor) -> Response:
        resp = self._get(f"blobs/{desc.digest}")
        if resp.status != 200:
            raise self._fail(resp, f"blob {desc.digest}")
        return resp


OciErrorType = NotFoundError | AuthError | RegistryError


def _error_codes(body: bytes) -> list[str]:
    """``CODE: message`` of each error in a distribution-spec error body."""
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    errors = doc.get("errors") if isinstance(doc, dict) else None
    out = []
    for e in errors if isinstance(errors, list) else []:
        if isinstance(e, dict):
            code = str(e.get("code", ""))[:60]
            msg = str(e.get("message", ""))[:200]
            out.append(f"{code}: {msg}" if msg else code)
    return out[:3]


class RegistrySource(ManifestSource):
    """``docker://``: an image in a registry."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.label = str(client.ref)

    def top(self) -> tuple[bytes, str, Digest]:
        ref = self.client.ref
        return self.client.manifest(ref.reference, ref.digest)

    def manifest(self, desc: Descriptor) -> tuple[bytes, str]:
        data, content_type, _ = self.client.manifest(str(desc.digest), desc.digest)
        if len(data) != desc.size:
            raise DigestError(
                f"manifest {desc.digest} from {self.client.name}: {len(data)} bytes, but its "
                f"descriptor says {desc.size}"
            )
        return data, content_type

    def blob(self, desc: Descriptor, limit: int) -> bytes:
        if desc.size > limit:
            raise FormatError(f"blob {desc.digest}: {desc.size} bytes, above the {limit} limit")
        resp = self.client.open_blob(desc)
        data = resp.read_all(limit)
        check_bytes(data, desc.digest, f"blob {desc.digest} from {self.client.name}", desc.size)
        return data

    def open_blob(self, desc: Descriptor) -> Response:
        return self.client.open_blob(desc)

    def close(self) -> None:
        self.client.http.close()
