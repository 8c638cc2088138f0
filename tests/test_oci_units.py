"""Small parts of the OCI importer: SOURCE syntax, platforms, credentials and challenges,
manifests, provenance records, the CLI's argument checks (no network, no root)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from csi.oci.auth import from_auth_file, load_credentials, parse_challenge, read_creds_file
from csi.oci.errors import AuthError, FormatError, PlatformError, SourceSyntaxError
from csi.oci.httpclient import redact
from csi.oci.manifest import Descriptor, Index, Manifest, Platform, parse_manifest
from csi.oci.platform import host_platform, parse_platform, select
from csi.oci.reference import ArchiveRef, DockerRef, LayoutRef, parse_source
from csi.repo import Repository
from csi.repo import provenance as prov

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("docker://alpine", "docker.io", "library/alpine", "latest", None),
        ("docker://user/app:1.0", "docker.io", "user/app", "1.0", None),
        ("docker://quay.io/org/app", "quay.io", "org/app", "latest", None),
        ("docker://localhost/app:x", "localhost", "app", "x", None),
        ("docker://127.0.0.1:5000/a/b/c:t_1", "127.0.0.1:5000", "a/b/c", "t_1", None),
        ("docker://h.io/app@sha256:" + "a" * 64, "h.io", "app", None, "sha256:" + "a" * 64),
        ("docker://h.io/app:v@sha256:" + "b" * 64, "h.io", "app", "v", "sha256:" + "b" * 64),
    ],
)
def test_docker_references(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_source(text)
    assert isinstance(ref, DockerRef)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert (str(ref.digest) if ref.digest else None) == digest
    assert ref.api_host == ("registry-1.docker.io" if registry == "docker.io" else registry)
    assert parse_source(str(ref)) == ref  # shown as it can be given again


@pytest.mark.parametrize(
    "text",
    [
        "alpine",
        "docker:alpine",
        "docker://Upper/Case",
        "docker://h.io/app:bad tag",
        "docker://h.io/app@sha256:short",
        "docker://h.io/../etc",
        "docker://h.io/app?x=1",
        "oci:",
        "oci:dir:bad tag",
        "docker-archive:",
        "containers-storage:x",
    ],
)
def test_bad_sources(text: str) -> None:
    with pytest.raises(SourceSyntaxError):
        parse_source(text)


def test_layout_and_archive_references() -> None:
    assert parse_source("oci:/srv/layout") == LayoutRef("/srv/layout", None)
    assert parse_source("oci:/srv/layout:v2") == LayoutRef("/srv/layout", "v2")
    assert parse_source("docker-archive:/x.tar") == ArchiveRef("/x.tar", None)
    assert parse_source("docker-archive:/x.tar:app:v1") == ArchiveRef("/x.tar", "app:v1")
    assert parse_source("docker-archive:/x.tar:@1") == ArchiveRef("/x.tar", "@1")


def _index(*platforms: tuple[str, str, str] | None) -> Index:
    d = "sha256:" + "0" * 64
    from csi.oci.digests import parse_digest

    return Index(
        "application/vnd.oci.image.index.v1+json",
        [
            Descriptor("m", parse_digest(d[:-1] + str(i)), 1, {}, Platform(*p) if p else None)
            for i, p in enumerate(platforms)
        ],
    )


def test_platform_selection() -> None:
    idx = _index(
        ("linux", "amd64", ""),
        ("linux", "arm", "v6"),
        ("linux", "arm", "v7"),
        ("linux", "arm64", "v8"),
        ("unknown", "unknown", ""),
    )
    assert select(idx, parse_platform("linux/amd64"), "x").digest.hex.endswith("0")
    assert select(idx, parse_platform("linux/arm/v7"), "x").digest.hex.endswith("2")
    assert select(idx, parse_platform("linux/arm/v6"), "x").digest.hex.endswith("1")
    assert select(idx, parse_platform("linux/arm64"), "x").digest.hex.endswith("3")
    assert select(idx, parse_platform("linux/aarch64"), "x").digest.hex.endswith("3")
    with pytest.raises(PlatformError) as e:
        select(idx, parse_platform("linux/arm/v5"), "x")
    assert "linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64/v8)" in str(e.value)
    assert "unknown" not in str(e.value)
    with pytest.raises(PlatformError):
        select(idx, parse_platform("windows/amd64"), "x")
    # An artifact index: one entry, no platform.
    assert select(_index(None), host_platform(), "x").digest.hex.endswith("0")
    with pytest.raises(SourceSyntaxError):
        parse_platform("linux")
    assert host_platform().os == "linux"


def test_challenges() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull",
    }
    assert parse_challenge('Basic realm="Registry \\"x\\""') == ("basic", {"realm": 'Registry "x"'})
    assert parse_challenge("Bearer") == ("bearer", {})


def test_credentials_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.write_text("alice:pa:ss\n")
    c = read_creds_file(str(creds))
    assert (c.username, c.password) == ("alice", "pa:ss")
    assert "pa:ss" not in repr(c)
    creds.write_text("no-colon\n")
    with pytest.raises(AuthError, match="USER:PASSWORD"):
        read_creds_file(str(creds))
    config = tmp_path / "config.json"
    auth = base64.b64encode(b"bob:pw").decode()
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": auth},
                    "https://reg.example:5000/v2/": {"username": "u", "password": "p"},
                    "other.example": {"identitytoken": "refresh"},
                }
            }
        )
    )
    hub = from_auth_file(config, "docker.io", required=True)
    assert hub is not None and (hub.username, hub.password) == ("bob", "pw")
    mine = from_auth_file(config, "reg.example:5000", required=True)
    assert mine is not None and (mine.username, mine.password) == ("u", "p")
    assert from_auth_file(config, "other.example", required=True) is None
    assert from_auth_file(config, "nowhere.example", required=True) is None
    with pytest.raises(AuthError, match="does not exist"):
        from_auth_file(tmp_path / "missing.json", "x", required=True)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(config))
    found = load_credentials("reg.example:5000")
    assert found is not None and found.username == "u"
    assert load_credentials("reg.example:5000", creds_file=None, authfile=None) == found


def test_redaction() -> None:
    assert redact("https://user:pw@h.io:8443/v2/x?token=abc") == "https://h.io:8443/v2/x"


def test_manifest_parsing() -> None:
    digest = "sha256:" + "c" * 64
    m = parse_manifest(
        json.dumps(
            {
                "schemaVersion": 2,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": digest, "size": 2},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": digest, "size": 3}],
            }
        ).encode(),
        "application/vnd.oci.image.manifest.v1+json",
        "m",
    )  # fmt: skip
    assert isinstance(m, Manifest) and m.is_image
    for doc, message in (
        ({"schemaVersion": 1}, "schema 1"),
        ({"schemaVersion": 3}, "schemaVersion"),
        ({"schemaVersion": 2, "mediaType": "text/plain"}, "unsupported manifest media type"),
        ({"schemaVersion": 2, "layers": [], "config": {"digest": digest}}, "size"),
        ({"schemaVersion": 2, "layers": [], "config": {"digest": "md5:x", "size": 1}}, "digest"),
        ([1, 2], "JSON object"),
    ):
        with pytest.raises(FormatError, match=message):
            parse_manifest(json.dumps(doc).encode(), None, "m")
    with pytest.raises(FormatError, match="limit"):
        parse_manifest(b" " * (5 << 20), None, "m")


def test_provenance_records(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo", create=True)
    image = repo.add_image(b"not really an image, but an object")
    other = repo.add_image(b"another one")
    rec = {"source": "docker://h.io/a:1", "manifest_digest": "sha256:" + "1" * 64}
    prov.record_image(repo, image, rec)
    prov.record_image(repo, image, rec)
    prov.record_image(repo, image, {**rec, "source": "oci:/x:1"})
    assert [s["source"] for s in prov.image_sources(repo, image)] == [
        "docker://h.io/a:1",
        "oci:/x:1",
    ]
    prov.record_ref(repo, "team/a:1", image, rec)
    repo.set_ref("team/a:1", image)
    got = prov.ref_record(repo, "team/a:1")
    assert got is not None and got["image"] == f"sha256:{image.hex()}"
    repo.set_ref("team/a:1", other)  # moved by someone else since: the record no longer applies
    assert prov.ref_record(repo, "team/a:1") is None
    assert prov.image_sources(repo, other) == []
    # Outside objects/ and images/: the repository still verifies.
    assert repo.verify().ok


def test_cli_arguments() -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "csi.cli.main", "import", *args],
            capture_output=True, text=True, cwd=ROOT, check=False,
        )  # fmt: skip

    proc = cli("--help")
    assert proc.returncode == 0 and "docker://HOST/NAME:TAG" in proc.stdout
    assert "--layers" in proc.stdout and "--platform" in proc.stdout
    proc = cli("docker://h/a", "--repo", "/nonexistent/x", "--layers", "--flatten")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    proc = cli("nonsense", "--repo", "/tmp/unused-repo-for-cli-test")
    assert proc.returncode == 1 and "expected docker://NAME" in proc.stderr
    proc = cli("oci:/x", "--repo", "/tmp/unused-repo-for-cli-test", "--platform", "linux")
    assert proc.returncode == 1 and "OS/ARCH" in proc.stderr


def test_cli_layers_output(tmp_path: Path) -> None:
    """``--layers`` prints one digest per layer (lowest first) and names them NAME-layerN."""
    from tests.ocilayers import E, Layout, layer_tar

    layout = Layout(tmp_path / "layout")
    base = layer_tar([E("./", "dir"), E("a", data=b"a" * 100), E("d", "dir"), E("d/x")])
    top = layer_tar([E("a", "whiteout"), E("d", "opaque"), E("d/y", data=b"y" * 100)])
    src = layout.tag("v1", layout.image([base, top]))
    repo = tmp_path / "repo"
    proc = subprocess.run(
        [sys.executable, "-m", "csi.cli.main", "import", src, "--repo", str(repo), "--layers",
         "--ref", "app"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    digests = proc.stdout.split()
    assert len(digests) == 2 and all(d.startswith("sha256:") for d in digests)
    assert f'layers: "{digests[0]},{digests[1]}"' in proc.stderr
    r = Repository(repo)
    assert [f"sha256:{r.resolve_ref(f'app-layer{i}').hex()}" for i in (0, 1)] == digests
    record = prov.ref_record(r, "app-layer1")
    assert record is not None and record["layer_index"] == 1 and record["source"] == src
    out = subprocess.run(
        [sys.executable, "-m", "csi.cli.main", "import", src, "--repo", str(repo), "--json"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    doc = json.loads(out)
    assert doc["kind"] == "image" and doc["layers"] == 2 and len(doc["images"]) == 1
    assert doc["images"][0] not in digests  # the flattened image is another tree
