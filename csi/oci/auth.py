"""Registry credentials and the ``WWW-Authenticate`` challenge flows (Basic and Bearer token).

Credentials, first found wins:

1. ``--creds-file FILE``: one line ``USER:PASSWORD``;
2. ``--authfile FILE``: a Docker/Podman ``config.json`` (``{"auths": {HOST: {"auth":
   base64(USER:PASSWORD)}}}``, or ``username`` / ``password`` fields);
3. the default auth files, as skopeo reads them: ``$REGISTRY_AUTH_FILE``,
   ``$XDG_RUNTIME_DIR/containers/auth.json``, ``$DOCKER_CONFIG/config.json``,
   ``~/.docker/config.json``;
4. none (anonymous; a token service may still hand out anonymous pull tokens).

Credential helpers (``credsStore``, ``credHelpers``) are not run, and identity tokens (OAuth2
refresh tokens) are not supported: the entry is ignored with a warning.

A registry answering 401 names its scheme. ``Basic``: the credentials are sent as they are.
``Bearer``: the realm (token service) is asked for a token for
``repository:NAME:pull`` (with the credentials as Basic auth, if any), and the token sent.
Secrets never appear in messages or logs.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AuthError, RegistryError
from .httpclient import HttpClient, redact

log = logging.getLogger(__name__)

TOKEN_LIMIT = 1 << 20
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)')


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    #: Where they came from (a file name), for messages.
    origin: str = ""

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def default_auth_files() -> list[Path]:
    out = []
    if p := os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(Path(p))
    if p := os.environ.get("XDG_RUNTIME_DIR"):
        out.append(Path(p) / "containers" / "auth.json")
    if p := os.environ.get("DOCKER_CONFIG"):
        out.append(Path(p) / "config.json")
    out.append(Path.home() / ".docker" / "config.json")
    return out


def read_creds_file(path: str) -> Credentials:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise AuthError(f"cannot read the credentials file {path}: {e.strerror or e}") from None
    line = text.strip("\r\n")
    user, sep, password = line.partition(":")
    if not sep or not user or "\n" in line:
        raise AuthError(f"{path}: expected a single line USER:PASSWORD")
    return Credentials(user, password, path)


def _hub_keys(host: str) -> list[str]:
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        return ["https://index.docker.io/v1/", "index.docker.io", "docker.io", host]
    return [host]


def _normalise_key(key: str) -> str:
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc
    return key.split("/", 1)[0].lower()


def from_auth_file(path: Path, registry: str, *, required: bool) -> Credentials | None:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        if required:
            raise AuthError(f"the auth file {path} does not exist") from None
        return None
    except (OSError, ValueError) as e:
        raise AuthError(f"cannot read the auth file {path}: {e}") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = {k.lower() for k in _hub_keys(registry)}
    for key, entry in auths.items():
        if key in _hub_keys(registry) or _normalise_key(key) in wanted:
            if not isinstance(entry, dict):
                continue
            if entry.get("identitytoken"):
                log.warning(
                    "%s: identity tokens are not supported; entry for %s ignored", path, key
                )
                continue
            if isinstance(entry.get("auth"), str) and entry["auth"]:
                try:
                    raw = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
                except (ValueError, UnicodeDecodeError):
                    raise AuthError(
                        f"{path}: the 'auth' of {key} is not base64 USER:PASSWORD"
                    ) from None
                user, sep, password = raw.partition(":")
                if not sep:
                    raise AuthError(f"{path}: the 'auth' of {key} is not USER:PASSWORD")
                return Credentials(user, password, str(path))
            name, secret = entry.get("username"), entry.get("password")
            if isinstance(name, str) and isinstance(secret, str) and name:
                return Credentials(name, secret, str(path))
    return None


def load_credentials(
    registry: str, creds_file: str | None = None, authfile: str | None = None
) -> Credentials | None:
    """The credentials for ``registry`` (``host[:port]``), see the module doc."""
    if creds_file:
        return read_creds_file(creds_file)
    if authfile:
        return from_auth_file(Path(authfile), registry, required=True)
    for path in default_auth_files():
        found = from_auth_file(path, registry, required=False)
        if found is not None:
            return found
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``('bearer', {'realm': ..., 'service': ..., 'scope': ...})`` from a WWW-Authenticate."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return scheme.lower(), params


def fetch_token(
    http: HttpClient,
    params: dict[str, str],
    scope: str,
    creds: Credentials | None,
    registry: str,
) -> str:
    """A bearer token from the challenge's realm for ``scope``."""
    realm = params.get("realm")
    if not realm:
        raise AuthError(f"registry {registry}: a Bearer challenge without a realm")
    query = {k: v for k, v in (("service", params.get("service")), ("scope", scope)) if v}
    url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
    resp = http.get(url, auth=creds.basic() if creds else None)
    body = resp.read_all(TOKEN_LIMIT)
    if resp.status in (401, 403):
        raise AuthError(_refused(registry, creds, f"the token service {redact(realm)}"))
    if resp.status != 200:
        raise RegistryError(
            f"registry {registry}: the token service {redact(realm)} answered {resp.status}"
        )
    try:
        doc = json.loads(body)
        token = doc.get("token") or doc.get("access_token")
    except (ValueError, AttributeError):
        token = None
    if not isinstance(token, str) or not token:
        raise RegistryError(f"registry {registry}: the token service gave no token")
    return token


def _refused(registry: str, creds: Credentials | None, who: str) -> str:
    if creds is None:
        return (
            f"registry {registry}: {who} requires credentials: give them with --creds-file "
            "or --authfile (or log in with docker/podman login)"
        )
    origin = f" from {creds.origin}" if creds.origin else ""
    return (
        f"registry {registry}: {who} refused the credentials of user "
        f"{creds.username!r}{origin} (wrong user name or password?)"
    )


def refused(registry: str, creds: Credentials | None) -> str:
    return _refused(registry, creds, "the registry")
