"""Repository layout (BRIEF §2.1): meta.json, objects, images, refs, verification."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from csi.image.fsverity import digest_bytes, digest_file
from csi.repo import (
    DigestMismatch,
    InvalidDigest,
    InvalidRefName,
    ReadOnlyRepository,
    RefNotFound,
    Repository,
    UnsupportedRepository,
    tmpfiles,
)
from csi.repo.tmpfiles import TempArea, remove_worker_dirs, rename_noreplace, worker_dir

from ._storekit import blob, files_under, temp_files


def test_create_writes_composefs_rs_meta(tmp_path: Path) -> None:
    r = Repository(tmp_path / "r", create=True)
    meta = json.loads((r.root / "meta.json").read_text())
    assert meta["version"] == 1
    assert meta["algorithm"] == "fsverity-sha256-12"
    assert set(meta["features"]) == {"compatible", "read-only-compatible", "incompatible"}
    assert (r.root / "objects").is_dir()
    assert (r.root / "images" / "refs").is_dir()
    assert oct((r.root / "meta.json").stat().st_mode & 0o777) == oct(0o644)
    # reopening (with or without create) keeps the file and accepts it
    before = (r.root / "meta.json").read_bytes()
    Repository(r.root)
    Repository(r.root, create=True)
    assert (r.root / "meta.json").read_bytes() == before


def test_sha512_repository_rejected_clearly(tmp_path: Path) -> None:
    tmp_path.joinpath("meta.json").write_text(
        json.dumps({"version": 1, "algorithm": "fsverity-sha512-12"})
    )
    with pytest.raises(UnsupportedRepository, match="sha512"):
        Repository(tmp_path)


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"version": 2, "algorithm": "fsverity-sha256-12"}, "version 2"),
        ({"version": 1, "algorithm": "fsverity-sha256-16"}, "algorithm"),
        (
            {"version": 1, "algorithm": "fsverity-sha256-12", "features": {"incompatible": ["x"]}},
            "incompatible",
        ),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_meta_rejected(tmp_path: Path, meta: object, match: str) -> None:
    tmp_path.joinpath("meta.json").write_text(json.dumps(meta))
    with pytest.raises(UnsupportedRepository, match=match):
        Repository(tmp_path)


def test_unknown_ro_compat_feature_opens_read_only(tmp_path: Path) -> None:
    r = Repository(tmp_path / "r", create=True)
    d, _ = r.add_object_bytes(b"x" * 100)
    meta = json.loads((r.root / "meta.json").read_text())
    meta["features"]["read-only-compatible"].append("future-thing")
    (r.root / "meta.json").write_text(json.dumps(meta))
    ro = Repository(r.root)
    assert ro.read_only and ro.has_object(d)
    with pytest.raises(ReadOnlyRepository):
        ro.add_object_bytes(b"y" * 100)


def test_missing_meta_accepted_as_sha256(tmp_path: Path) -> None:
    (tmp_path / "objects").mkdir()
    r = Repository(tmp_path)
    d, added = r.add_object_bytes(b"hello world")
    assert added and d.hex() == "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64"
    assert not (tmp_path / "meta.json").exists()


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="does not exist"):
        Repository(tmp_path / "nope")


def test_object_layout_and_dedup(tmp_path: Path) -> None:
    r = Repository(tmp_path, create=True)
    data = blob(1, 10000)
    d, added = r.add_object_bytes(data)
    assert added and d == digest_bytes(data)
    h = d.hex()
    assert r.object_path(d) == tmp_path / "objects" / h[:2] / h[2:]
    assert r.object_path(d).read_bytes() == data
    assert r.object_path(d).stat().st_mode & 0o777 == 0o644
    assert r.add_object_bytes(data) == (d, False)
    assert list(r.iter_objects()) == [d]
    assert temp_files(tmp_path) == []


def test_add_object_file_verifies_and_copies(tmp_path: Path) -> None:
    r = Repository(tmp_path / "r", create=True)
    src = tmp_path / "src"
    data = blob("big", 3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    d, added = r.add_object_file(src)
    assert added and d == digest_file(src)
    assert r.object_path(d).read_bytes() == data
    assert r.add_object_file(src, d) == (d, False)
    assert r.add_object_file(src, d, verify=False) == (d, False)


def test_add_object_file_mismatch_stores_nothing(tmp_path: Path) -> None:
    r = Repository(tmp_path / "r", create=True)
    src = tmp_path / "src"
    src.write_bytes(blob(2))
    wrong = digest_bytes(b"something else")
    with pytest.raises(DigestMismatch) as ei:
        r.add_object_file(src, wrong)
    assert ei.value.expected == wrong and ei.value.actual == digest_file(src)
    assert files_under(r.root / "objects") == []
    assert temp_files(r.root) == []


def test_images_and_refs(tmp_path: Path) -> None:
    r = Repository(tmp_path, create=True)
    img = blob("image", 5000)
    d = r.add_image(img)
    link = tmp_path / "images" / d.hex()
    assert os.readlink(link) == f"../objects/{d.hex()[:2]}/{d.hex()[2:]}"
    assert link.read_bytes() == img
    assert r.read_image(d) == img and list(r.iter_images()) == [d]

    r.set_ref("app", d)
    r.set_ref("models/llama-3-8b:v2", d)
    r.set_ref("a/b/c", d)
    assert os.readlink(tmp_path / "images/refs/app") == f"../{d.hex()}"
    assert os.readlink(tmp_path / "images/refs/models/llama-3-8b:v2") == f"../../{d.hex()}"
    assert os.readlink(tmp_path / "images/refs/a/b/c") == f"../../../{d.hex()}"
    for name in ("app", "models/llama-3-8b:v2", "a/b/c"):
        assert r.resolve_ref(name) == d
        assert (tmp_path / "images/refs" / name).read_bytes() == img
    assert dict(r.iter_refs()) == {"app": d, "models/llama-3-8b:v2": d, "a/b/c": d}

    d2 = r.add_image(blob("image2", 5000))
    r.set_ref("app", d2)  # atomic replace
    assert r.resolve_ref("app") == d2
    assert temp_files(tmp_path) == []


def test_resolve_digest_forms(tmp_path: Path) -> None:
    r = Repository(tmp_path, create=True)
    d = digest_bytes(b"x")
    assert r.resolve_ref("sha256:" + d.hex()) == d
    assert r.resolve_ref(d.hex()) == d
    assert r.resolve_ref(d.hex().upper()) == d
    with pytest.raises(InvalidDigest):
        r.resolve_ref("sha256:1234")
    with pytest.raises(RefNotFound, match="nothere"):
        r.resolve_ref("nothere")
    (tmp_path / "images/refs/bad").symlink_to("../not-a-digest")
    with pytest.raises(Exception, match="not an image name"):
        r.resolve_ref("bad")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/abs",
        "a//b",
        "a/../b",
        "..",
        ".",
        "a/./b",
        "x\ny",
        "tab\there",
        "sp ace",
        "b\\s",
        "a/",
        "x" * 256,
        "/".join(["abcd"] * 300),
        "nul\0",
    ],
)
def test_invalid_ref_names(tmp_path: Path, name: str) -> None:
    r = Repository(tmp_path, create=True)
    with pytest.raises(InvalidRefName):
        r.set_ref(name, digest_bytes(b"x"))
    assert files_under(tmp_path / "images" / "refs") == []


def test_verify_reports_corruption_and_dangling_links(tmp_path: Path) -> None:
    r = Repository(tmp_path, create=True)
    r.add_object_bytes(blob(1))
    bad, _ = r.add_object_bytes(blob(2))
    img = r.add_image(blob(3))
    r.set_ref("ok", img)
    assert r.verify().ok
    p = r.object_path(bad)
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    dangling = digest_bytes(b"gone")
    r.link_image(dangling)
    r.set_ref("lost", dangling)
    seen: list[tuple[int, int]] = []
    rep = r.verify(progress=lambda i, n: seen.append((i, n)))
    probs = dict(rep.problems)
    assert set(probs) == {
        f"objects/{bad.hex()[:2]}/{bad.hex()[2:]}",
        f"images/{dangling.hex()}",
        "images/refs/lost",
    }
    assert not rep.ok and "3 problem" in str(rep)
    assert rep.objects_checked == 3 and seen[-1] == (3, 3)


def test_temp_area_cleans_only_dead_writers(tmp_path: Path) -> None:
    area = TempArea(tmp_path / ".tmp")
    live = area.create()
    os.write(live.fd, b"in progress")
    dead = area.create()
    # simulate a dead writer: drop its descriptors without removing the file
    dead.close_write()
    os.close(dead.lock_fd)
    dead.lock_fd = -1
    os.symlink("x", tmp_path / ".tmp" / "999999999-deadbeef.lnk")
    assert area.clean() == 2
    assert live.path.exists() and not dead.path.exists()
    live.discard()
    assert temp_files(tmp_path) == []


def test_worker_dirs_go_with_their_owner(tmp_path: Path) -> None:
    """A fetch worker writes in a directory of its own, named after the owner it works for:
    the cleaner removes it, files and all, once that owner is gone, and keeps a live
    owner's; the owner removes its pool's directories itself when its workers are done."""
    area = TempArea(tmp_path / ".tmp")
    tmp = str(area.path)
    live = area.owner()
    dead = "ab" * 16  # an owner id nobody holds
    mine = worker_dir(tmp, f"{live}-p1", "w1")
    other_pool = worker_dir(tmp, f"{live}-p2", "w1")
    gone = worker_dir(tmp, f"{dead}-p1", "w2")
    assert worker_dir(tmp, f"{live}-p1", "w1") == mine  # made once
    Path(mine, "a.worker.tmp").write_bytes(b"1")
    Path(other_pool, "b.worker.tmp").write_bytes(b"22")
    Path(gone, "c.worker.tmp").write_bytes(b"333")
    Path(gone, "d.worker.tmp").write_bytes(b"4444")
    assert area.leftovers() == (2, 7)
    assert area.clean() == 2
    assert not os.path.exists(gone)
    assert os.listdir(mine) == ["a.worker.tmp"] and os.listdir(other_pool) == ["b.worker.tmp"]
    assert remove_worker_dirs(tmp, f"{live}-p1") == 1
    assert not os.path.exists(mine) and os.path.exists(other_pool)
    assert remove_worker_dirs(tmp, f"{live}-p1") == 0


@pytest.mark.parametrize("noreplace", [True, False], ids=["renameat2", "look-then-rename"])
def test_rename_noreplace_never_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, noreplace: bool
) -> None:
    if not noreplace:
        monkeypatch.setattr(tmpfiles, "_noreplace_ok", False)
    elif tmpfiles._renameat2 is None:
        pytest.skip("this C library has no renameat2")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    assert rename_noreplace(src, dst) is True
    assert dst.read_bytes() == b"new" and not src.exists()
    src.write_bytes(b"newer")
    assert rename_noreplace(src, dst) is False  # the name is taken: it stays as it was
    assert dst.read_bytes() == b"new" and src.read_bytes() == b"newer"
    with pytest.raises(FileNotFoundError):
        rename_noreplace(tmp_path / "missing", tmp_path / "x")


def test_rename_noreplace_falls_back_where_the_filesystem_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem without RENAME_NOREPLACE answers EINVAL: the rename is done by looking
    first, and from then on without asking again."""
    import ctypes
    import errno

    calls: list[bytes] = []

    def refuse(_a: int, src: bytes, _b: int, _dst: bytes, _flags: int) -> int:
        calls.append(src)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(tmpfiles, "_renameat2", refuse)
    monkeypatch.setattr(tmpfiles, "_noreplace_ok", True)
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    assert rename_noreplace(tmp_path / "a", tmp_path / "c") is True
    assert rename_noreplace(tmp_path / "b", tmp_path / "c") is False
    assert (tmp_path / "c").read_bytes() == b"a" and (tmp_path / "b").exists()
    assert len(calls) == 1 and tmpfiles._noreplace_ok is False


def test_lock_is_exclusive_and_removes_its_file(tmp_path: Path) -> None:
    import threading

    area = TempArea(tmp_path / ".tmp")
    order: list[str] = []
    inside = threading.Event()
    go = threading.Event()

    def other() -> None:
        inside.wait()
        with area.lock("n"):
            order.append("other")

    t = threading.Thread(target=other)
    t.start()
    with area.lock("n"):
        inside.set()
        go.wait(0.2)  # give the other thread a chance to (wrongly) enter
        order.append("first")
    t.join()
    assert order == ["first", "other"]
    assert files_under(tmp_path / ".tmp" / "locks") == []


def _upstream_tool(name: str) -> Path:
    up = os.environ.get("COMPOSEFS_UPSTREAM")
    if not up:
        pytest.skip("COMPOSEFS_UPSTREAM is not set: upstream mkcomposefs is unavailable")
    tool = Path(up) / "build" / "tools" / name
    if not tool.exists():
        pytest.skip(f"{tool} not built")
    return tool


def test_mkcomposefs_digest_store_is_our_objects_layout(tmp_path: Path) -> None:
    mk = _upstream_tool("mkcomposefs")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        (src / "sub" / f"f{i}").write_bytes(blob(i, 5000 + i))
    r = Repository(tmp_path / "repo", create=True)
    out = tmp_path / "img"
    subprocess.run(
        [str(mk), f"--digest-store={r.root / 'objects'}", str(src), str(out)], check=True
    )
    assert len(list(r.iter_objects())) == 5
    assert r.verify().ok
    d = r.add_image(out.read_bytes())
    ours = Repository(tmp_path / "ours", create=True)
    for i in range(5):
        ours.add_object_file(src / "sub" / f"f{i}")
    assert sorted(ours.iter_objects()) == sorted(x for x in r.iter_objects() if x != d)
    shutil.rmtree(tmp_path / "ours")
