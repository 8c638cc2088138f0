"""The store across processes: a writer killed with SIGKILL mid-object, and several processes
filling one store at once."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

from csi.image.fsverity import digest_bytes
from csi.store import Store

from ._storekit import blob, fake_image, fake_parser, files_under, temp_files, writing

REPO_ROOT = Path(__file__).resolve().parent.parent

KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from csi.store import Store
    from tests._storekit import blob
    from csi.image.fsverity import digest_bytes

    store = Store(Path(sys.argv[1]))
    data = blob("victim", 3 * 1024 * 1024)

    def fill(w):
        w.write(data[: len(data) // 2])
        print("half", flush=True)
        while True:  # blocks until SIGKILL
            time.sleep(3600)

    store.ensure(digest_bytes(data), fill)
    """
)


def test_sigkill_mid_write_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store(root).close()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(root)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "half"
        assert len(temp_files(root)) == 1  # the half-written object is only in the temp area
        # the dead-writer cleaner must not touch a live writer's file
        with Store(root) as other:
            assert other.recovery.temp_removed == 0
        assert len(temp_files(root)) == 1
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert files_under(root / "objects") == []
    data = blob("victim", 3 * 1024 * 1024)
    d = digest_bytes(data)
    with Store(root) as s:
        assert s.recovery.temp_removed >= 1
        assert temp_files(root) == []
        assert not s.has_object(d)
        # the dead process's per-digest lock does not block a new writer
        assert s.ensure(d, writing(data)) is True
        assert s.object_path(d).read_bytes() == data
        assert s.fsck().ok


N_OBJECTS = 40


def _worker(root: str, seed: int, log: str, q: mp.Queue) -> None:  # type: ignore[type-arg]
    import random
    import threading

    store = Store(Path(root), image_parser=fake_parser)
    contents = [blob(f"mp{i}", 2000 + 13 * i) for i in range(N_OBJECTS)]
    digests = [digest_bytes(c) for c in contents]
    stored = 0
    mu = threading.Lock()

    def fill_for(i: int):  # type: ignore[no-untyped-def]
        def fill(w) -> None:  # type: ignore[no-untyped-def]
            with open(log, "a") as f:  # O_APPEND: one line per fill, across processes
                f.write(digests[i].hex() + "\n")
            w.write(contents[i])

        return fill

    def run(k: int) -> None:
        nonlocal stored
        order = list(range(N_OBJECTS))
        random.Random(seed * 100 + k).shuffle(order)
        for i in order:
            if store.ensure(digests[i], fill_for(i)):
                with mu:
                    stored += 1

    image = fake_image(digests, bytes([seed]))
    with store.pin([digest_bytes(image)]):  # as a fetch does: pin, add the image, fill
        img = store.add_image_bytes(image)
        threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        store.lease(f"proc-{seed}", [img])
    store.gc()  # concurrent GCs must not remove what others lease or are fetching
    store.close()
    q.put(stored)


def test_processes_sharing_a_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    log = tmp_path / "fills.log"
    Store(root, image_parser=fake_parser).close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(root), s, str(log), q)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    total_stored = sum(q.get(timeout=10) for _ in procs)
    fills = Counter(log.read_text().split())
    assert total_stored == N_OBJECTS
    assert len(fills) == N_OBJECTS and set(fills.values()) == {1}
    with Store(root, image_parser=fake_parser) as s:
        assert s.fsck().ok
        assert temp_files(root) == []
        leases = s.leases()
        assert len(leases) == 4
        for imgs in leases.values():
            for img in imgs:
                assert s.has_image(img) and s.missing_objects(img) == set()
        assert s.usage().files == N_OBJECTS + 4
        assert s.recovery.recorded_unknown == 0 and s.recovery.dropped_missing == 0
    assert os.path.exists(root / "state.db")


UNSHARE_PID = ["unshare", "--pid", "--fork", "--kill-child"]
PID1_HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from csi.store import Store
    from csi.repo.tmpfiles import WORKER_TEMP_SUFFIX

    assert os.getpid() == 1, os.getpid()  # pid 1 of its own pid namespace, as in a container
    store = Store(Path(sys.argv[1]))
    image = bytes.fromhex(sys.argv[2])
    with store.pin([image]):
        # What a bulk fetch's worker leaves in the temp area while it writes.
        leftover = store.repo.tmp.path / f"{store.repo.tmp.owner()}-00{WORKER_TEMP_SUFFIX}"
        leftover.write_bytes(b"half an object" * 1000)
        print("pinned", flush=True)
        time.sleep(3600)  # until SIGKILL
    """
)


def test_leftovers_of_a_killed_pid1_are_found_and_collected(tmp_path: Path) -> None:
    """A process that is pid 1 of its pid namespace (a container's entry point), killed while
    it pins an image and has worker temp files: its pin no longer protects the image, fsck
    reports the leak, and the temp files go. By pid, both looked alive forever (pid 1)."""
    import shutil

    import pytest

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a pid namespace")
    root = tmp_path / "store"
    with Store(root, image_parser=fake_parser) as s:
        img = fake_image([digest_bytes(blob("pinned-object", 5000))], nonce=b"pid1")
        image = s.add_image_bytes(img)
    proc = subprocess.Popen(
        [*UNSHARE_PID, sys.executable, "-c", PID1_HOLDER, str(root), image.hex()],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "pinned"
        with Store(root, image_parser=fake_parser) as s:
            assert s.gc().removed_images == []  # a live pin protects it
            rep = s.fsck(repair=False)
            assert rep.stale_pins == 0 and rep.leaked_temp_files == 0, str(rep)
        # Kill the namespace's pid 1 itself (unshare waits for it, then exits).
        (child,) = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(child), signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The holder is gone. A store opened now finds its leftovers; nothing waits for "pid 1".
    with Store(root, image_parser=fake_parser) as s:
        rep = s.fsck(repair=False)
        assert rep.stale_pins == 1, str(rep)
        assert rep.temp_removed_at_open + rep.leaked_temp_files == 1, str(rep)
        assert "leak" in str(rep) and not rep.ok
        s.fsck(repair=True)
        assert s.fsck(repair=False).stale_pins == 0
        assert s.gc().removed_images == [image]
    assert not [p for p in (root / ".tmp").iterdir() if p.is_file()]
