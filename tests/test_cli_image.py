"""The publishing commands: build, inspect and verify, run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from csi.cli.main import main
from csi.image.dump import format_dump
from csi.image.reader import Image
from csi.repo import Repository
from tests.writer_trees import tree_basic


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi.cli.main", *args], capture_output=True, text=True
    )


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "small.txt").write_bytes(b"inline\n")
    (root / "sub" / "big.bin").write_bytes(bytes(range(256)) * 1000)
    (root / "sub" / "copy.bin").write_bytes(bytes(range(256)) * 1000)  # same object
    (root / "sub" / "other.bin").write_bytes(b"x" * 70000)
    os.link(root / "sub" / "other.bin", root / "hard")
    (root / "link").symlink_to("sub/big.bin")
    return root


def test_build_inspect_verify(src: Path, tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    r = run_cli(
        "build", str(src), "--repo", str(repo_dir), "--ref", "app:v1", "--ref", "app/latest"
    )
    assert r.returncode == 0, r.stderr
    digest = r.stdout.strip()
    assert digest.startswith("sha256:") and len(digest) == 71
    assert "stored 2 new object(s)" in r.stderr  # big.bin and copy.bin share one object
    repo = Repository(repo_dir)
    assert repo.resolve_ref("app:v1").hex() == digest[7:]
    assert repo.resolve_ref("app/latest").hex() == digest[7:]
    assert len(list(repo.iter_objects())) == 3  # two contents + the image

    # Building again stores nothing new and yields the same image.
    again = run_cli("build", str(src), "--repo", str(repo_dir))
    assert again.stdout.strip() == digest
    assert "stored 0 new object(s), 3 already present" in again.stderr

    info = run_cli("inspect", "app:v1", "--repo", str(repo_dir), "--json")
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["digest"] == digest
    assert summary["files"] == 4  # small, big, copy, other (= hard)
    assert summary["directories"] == 2 and summary["symlinks"] == 1 and summary["other"] == 0
    assert summary["objects"] == 2
    assert summary["external_bytes"] == 256000 * 2 + 70000

    dump = run_cli("inspect", digest, "--repo", str(repo_dir), "--dump")
    lines = dump.stdout.splitlines()
    assert lines[0].startswith("/ ")
    assert any(line.startswith("/small.txt 7 100644") and "inline\\n" in line for line in lines)
    assert any(" @100644 " in line for line in lines)  # the hard link

    ok = run_cli("verify", "--repo", str(repo_dir))
    assert ok.returncode == 0 and "all good" in ok.stdout


def test_verify_reports_corruption(src: Path, tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    assert main(["build", str(src), "--repo", str(repo_dir)]) == 0
    repo = Repository(repo_dir)
    victim = next(
        p for p in (repo_dir / "objects").rglob("*") if p.is_file() and p.stat().st_size == 70000
    )
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))
    r = run_cli("verify", "--repo", str(repo_dir))
    assert r.returncode == 1
    assert victim.name in r.stdout
    assert repo.has_object(bytes.fromhex(victim.parent.name + victim.name))


def test_build_from_dump_matches_the_tree(tmp_path: Path) -> None:
    dump = tmp_path / "t.dump"
    dump.write_bytes(format_dump(tree_basic(), exact=True))
    out = tmp_path / "img"
    r = run_cli(
        "build", "--from-dump", str(dump), "--repo", str(tmp_path / "repo"), "--image-out", str(out)
    )
    assert r.returncode == 0, r.stderr
    assert "not in the repository" in r.stderr  # the dump names objects nobody stored
    from csi.image.writer import write_image

    assert out.read_bytes() == write_image(tree_basic())


def test_options_change_the_image(src: Path, tmp_path: Path) -> None:
    digests = set()
    for extra in ([], ["--use-epoch"], ["--no-hardlinks"], ["--min-version", "1"]):
        r = run_cli("build", str(src), "--repo", str(tmp_path / "repo"), *extra)
        assert r.returncode == 0, r.stderr
        digests.add(r.stdout.strip())
    assert len(digests) == 4
    r = run_cli("build", str(src), "--repo", str(tmp_path / "repo"), "--use-epoch")
    with Image.open(
        Repository(tmp_path / "repo").image_path(bytes.fromhex(r.stdout.strip()[7:]))
    ) as img:
        assert img.getattr(img.root_nid).mtime_sec == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "nope:v1", "--repo", "{repo}"], "not found"),
        (["inspect", "{missing}"], "no such file"),
        (["inspect", "{notimage}"], "not a valid composefs image"),
        (["build", "{missing}", "--repo", "{repo}"], "no such file"),
        (["build", "--from-dump", "{notimage}", "--repo", "{repo}"], "line 1"),
        (["verify", "--repo", "{missing}"], ""),
    ],
)
def test_clear_errors(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    Repository(tmp_path / "repo", create=True)
    (tmp_path / "notimage").write_text("this is not an image\n")
    fmt = {
        "repo": str(tmp_path / "repo"),
        "missing": str(tmp_path / "missing"),
        "notimage": str(tmp_path / "notimage"),
    }
    r = run_cli(*[a.format(**fmt) for a in args])
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "error:" in r.stderr
    assert message in r.stderr.lower()


def test_help_lists_every_command() -> None:
    r = run_cli("--help")
    for cmd in (
        "build",
        "inspect",
        "verify",
        "pull",
        "gc",
        "fsck",
        "mount",
        "dataplane",
        "node",
        "controller",
    ):
        assert cmd in r.stdout
