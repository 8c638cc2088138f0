"""Node-store commands run as a user would: pull, fsck, gc (local repositories)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from csi.image.tree import S_IFDIR, Node, Tree, object_path
from csi.image.writer import write_image
from csi.repo import Repository
from csi.store import Store
from tests.writer_trees import reg

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi.cli.main", *args], capture_output=True, text=True
    )


def publish(repo: Repository, contents: list[bytes], ref: str) -> bytes:
    tree = Tree(Node(mode=S_IFDIR | 0o755))
    for i, data in enumerate(contents):
        node = reg(data)
        digest, _ = repo.add_object_bytes(data)
        node.digest = digest
        node.payload = object_path(digest)
        tree.root.add(b"f%d" % i, node)
    digest = repo.add_image(write_image(tree))
    repo.set_ref(ref, digest)
    return digest


def test_pull_fsck_gc(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo", create=True)
    shared = [bytes([i]) * 5000 for i in range(9)]
    one = publish(repo, [*shared, b"a" * 7000], "one:v1")
    two = publish(repo, [*shared, b"b" * 7000], "two:v1")
    store_dir = tmp_path / "store"

    r = run_cli("pull", "one:v1", "--repository", str(tmp_path / "repo"), "--store", str(store_dir))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"sha256:{one.hex()}"
    assert "10 fetched, 0 already present" in r.stderr
    r = run_cli(
        "pull",
        f"sha256:{two.hex()}",
        "--repository",
        f"file://{tmp_path / 'repo'}",
        "--store",
        str(store_dir),
    )
    assert r.returncode == 0, r.stderr
    assert "1 fetched, 9 already present" in r.stderr  # dedup across images

    r = run_cli("fsck", "--store", str(store_dir))
    assert r.returncode == 0 and "all good" in r.stdout
    with Store(store_dir) as store:
        victim = store.object_path(repo.resolve_ref("one:v1"))  # the image itself
        bad = store.object_path(next(iter(store.image_objects(one) - store.image_objects(two))))
    bad.chmod(0o644)
    bad.write_bytes(b"z" * 7000)
    r = run_cli("fsck", "--store", str(store_dir))
    assert r.returncode == 1
    assert not bad.exists()  # quarantined
    assert victim.exists()

    r = run_cli("gc", "--store", str(store_dir), "--dry-run")
    assert r.returncode == 0 and "would free" in r.stdout
    with Store(store_dir) as store:
        assert store.repo.has_image(two)
        store.lease("pod-a", [two])
    r = run_cli("gc", "--store", str(store_dir))
    assert r.returncode == 0, r.stderr
    with Store(store_dir) as store:
        assert store.repo.has_image(two)  # leased: kept with all its objects
        assert not store.missing_objects(two)
        assert not store.repo.has_image(one)


def test_pull_errors_are_clear(tmp_path: Path) -> None:
    Repository(tmp_path / "repo", create=True)
    r = run_cli(
        "pull",
        "missing:v1",
        "--repository",
        str(tmp_path / "repo"),
        "--store",
        str(tmp_path / "store"),
    )
    assert r.returncode == 1
    assert "error:" in r.stderr and "not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("pull", "x", "--repository", "http://127.0.0.1:9/", "--store", str(tmp_path / "s"))
    assert r.returncode == 1 and "allow" in r.stderr.lower()


@pytest.mark.parametrize(
    ("argv", "thresholds"),
    [
        (["verify", "--repo", "/nonexistent/repo"], [100_000, 50, 100]),
        (["dataplane", "--config", "/nonexistent/config.yaml"], [700, 10, 10]),
    ],
)
def test_commands_tune_the_collector_but_the_data_plane(
    argv: list[str], thresholds: list[int]
) -> None:
    """Fetching and building commands collect cyclic garbage after 100,000 new objects (full
    passes over a big image's tasks were seconds of a pull); the data plane keeps the
    interpreter's defaults. Each command here fails at once on a missing path."""
    code = (
        "import gc, json, sys\n"
        "from csi.cli.main import main\n"
        f"rc = main({argv!r})\n"
        "print(json.dumps([rc, list(gc.get_threshold())]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    rc, got = json.loads(r.stdout.strip().splitlines()[-1])
    assert rc != 0 and "nonexistent" in r.stderr
    assert got == thresholds
