"""Registries that want credentials: Debian's docker-registry with htpasswd (which it serves only
over TLS: a throw-away CA and a certificate for 127.0.0.1) and with token auth (our token
service in :class:`tests.ocikit.TokenServer` signs the JWTs it verifies). Credentials come from
a file, a docker ``config.json`` or the default location; wrong ones fail clearly, without the
secret in the message, and leave the repository as it was."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from csi.oci.errors import AuthError, RegistryError
from csi.oci.importer import ImportOptions, run_import
from csi.repo import Repository
from tests.fetchkit import make_tls
from tests.ocikit import TokenServer, htpasswd_file, registry, repo_files, tools_missing
from tests.ocilayers import E, Layout, layer_tar

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-Pw-9f2b"
WRONG = "not-the-password-77"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = tools_missing("docker-registry", "skopeo", "htpasswd", "openssl")
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no credentials from the machine's own files
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(var, raising=False)


def small_image(tmp: Path) -> str:
    layout = Layout(tmp / "layout")
    tar = layer_tar([E("./", "dir"), E("hello", data=b"hello from a private registry\n" * 10)])
    return layout.tag("v1", layout.image([tar]))


def write_creds(path: Path, user: str, password: str) -> str:
    path.write_text(f"{user}:{password}\n")
    return str(path)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ.copy(),
        check=False,
    )


def test_htpasswd_over_tls(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    users = htpasswd_file(tmp_path / "htpasswd", "alice", PASSWORD)
    with registry(tmp_path / "reg", tls=(tls.server_cert, tls.server_key), htpasswd=users) as reg:
        ref = reg.push(small_image(tmp_path), "private/app:v1", f"--dest-creds=alice:{PASSWORD}")
        repo_dir = tmp_path / "repo"
        repo = Repository(repo_dir, create=True)
        ca = str(tls.ca_cert)

        creds = write_creds(tmp_path / "creds", "alice", PASSWORD)
        first = run_import(ref, repo, ImportOptions(creds_file=creds, ca_bundle=ca))
        auth = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        config = tmp_path / "auth.json"
        config.write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        second = run_import(ref, repo, ImportOptions(authfile=str(config), ca_bundle=ca))
        docker_dir = Path(os.environ["HOME"]) / ".docker"
        docker_dir.mkdir()
        (docker_dir / "config.json").write_text(
            json.dumps({"auths": {f"https://{reg.host}": {"username": "alice",
                                                          "password": PASSWORD}}})
        )  # fmt: skip
        third = run_import(ref, repo, ImportOptions(ca_bundle=ca))
        assert first.images == second.images == third.images
        before = repo_files(repo_dir)

        bad = write_creds(tmp_path / "bad", "alice", WRONG)
        with pytest.raises(AuthError) as err:
            run_import(ref, repo, ImportOptions(creds_file=bad, ca_bundle=ca, refs=["x"]))
        message = str(err.value)
        assert "refused the credentials of user 'alice'" in message
        assert "wrong user name or password" in message
        assert WRONG not in message and PASSWORD not in message
        assert repo_files(repo_dir) == before

        (docker_dir / "config.json").unlink()
        with pytest.raises(AuthError, match="requires credentials"):
            run_import(ref, repo, ImportOptions(ca_bundle=ca))
        with pytest.raises(RegistryError, match="TLS certificate not trusted"):
            run_import(ref, repo, ImportOptions(creds_file=creds))
        assert repo_files(repo_dir) == before

        proc = cli("import", ref, "--repo", str(repo_dir), "--creds-file", bad, "--ca-bundle", ca)
        assert proc.returncode == 1
        assert "composefs-csi import: error: registry" in proc.stderr
        assert "refused the credentials of user 'alice'" in proc.stderr
        assert WRONG not in proc.stderr + proc.stdout
        assert repo_files(repo_dir) == before


def test_token_auth(tmp_path: Path) -> None:
    with (
        TokenServer(tmp_path / "token", "bob", PASSWORD) as tokens,
        registry(tmp_path / "reg", token=tokens.registry_config()) as reg,
    ):
        ref = reg.push(small_image(tmp_path), "team/app:v1", f"--dest-creds=bob:{PASSWORD}")
        repo_dir = tmp_path / "repo"
        repo = Repository(repo_dir, create=True)
        tokens.requests.clear()
        creds = write_creds(tmp_path / "creds", "bob", PASSWORD)
        result = run_import(ref, repo, ImportOptions(creds_file=creds, plain_http=True))
        assert len(result.images) == 1
        # The registry sent us to the token service, which got the credentials.
        assert tokens.requests and tokens.requests[0]["path"] == "/token"
        assert tokens.requests[0]["authorization"].startswith("Basic ")
        before = repo_files(repo_dir)
        bad = write_creds(tmp_path / "bad", "bob", WRONG)
        with pytest.raises(AuthError) as err:
            run_import(ref, repo, ImportOptions(creds_file=bad, plain_http=True))
        assert "the token service" in str(err.value)
        assert "refused the credentials of user 'bob'" in str(err.value)
        assert WRONG not in str(err.value)
        with pytest.raises(AuthError, match="requires credentials"):
            run_import(ref, repo, ImportOptions(plain_http=True))
        assert repo_files(repo_dir) == before
        # Without --plain-http the client speaks TLS, which this registry does not.
        with pytest.raises(RegistryError, match=reg.host):
            run_import(ref, repo, ImportOptions(creds_file=creds))
