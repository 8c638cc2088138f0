"""Property: GC never removes a leased (or pinned) image or any object it references.

A hypothesis state machine runs random sequences of fetch-like adds, leases, releases,
touches, reopenings and GCs (with and without targets, dry runs, size caps) against a real
store, and checks the invariant plus a model of what must be present after every step.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from csi.image.fsverity import digest_bytes
from csi.store import Store

from ._storekit import blob, fake_image, fake_parser, put

POOL = [blob(f"pool{i}", 100 + 37 * i) for i in range(12)]
POOL_DIGESTS = [digest_bytes(b) for b in POOL]


class GcMachine(RuleBasedStateMachine):
    images = Bundle("images")
    holders = Bundle("holders")

    @initialize(cap=st.sampled_from([None, 2000, 6000]))
    def open_store(self, cap: int | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gcprop-"))
        self.cap = cap
        self.store = Store(self.dir / "s", size_cap=cap, image_parser=fake_parser, fsync=False)
        self.refs: dict[bytes, set[bytes]] = {}  # every image ever made -> objects
        self.leases: dict[str, set[bytes]] = {}
        self.nonce = 0

    def teardown(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------

    def protected(self) -> set[bytes]:
        return set().union(*self.leases.values()) if self.leases else set()

    def snapshot(self) -> tuple[set[bytes], set[bytes]]:
        """(images present, files present) on disk."""
        imgs = {i for i in self.refs if self.store.has_image(i)}
        files = set(self.store.repo.iter_objects())
        return imgs, files

    # -- rules ---------------------------------------------------------------------------

    @rule(
        target=images,
        objs=st.sets(st.integers(0, len(POOL) - 1), max_size=5),
        fetch_all=st.booleans(),
    )
    def add_image(self, objs: set[int], fetch_all: bool) -> bytes:
        self.nonce += 1
        digests = {POOL_DIGESTS[i] for i in objs}
        data = fake_image(digests, self.nonce.to_bytes(8, "little"))
        d = digest_bytes(data)
        with self.store.pin([d]):  # what a fetch does while it works
            self.store.add_image_bytes(data)
            for i in sorted(objs) if fetch_all else sorted(objs)[:1]:
                put(self.store, POOL[i])
            assert self.store.has_image(d)
        self.refs[d] = digests
        return d

    @rule(image=images)
    def refetch_objects(self, image: bytes) -> None:
        with self.store.pin([image]):
            if not self.store.has_image(image):
                return
            for o in self.store.missing_objects(image):
                put(self.store, POOL[POOL_DIGESTS.index(o)])
            assert self.store.missing_objects(image) == set()

    @rule(
        target=holders,
        name=st.sampled_from(["vol-a", "vol-b", "vol-c"]),
        imgs=st.lists(images, max_size=3),
    )
    def lease(self, name: str, imgs: list[bytes]) -> str:
        self.store.lease(name, imgs)
        self.leases.setdefault(name, set()).update(imgs)
        return name

    @rule(name=consumes(holders))
    def release(self, name: str) -> None:
        self.store.release(name)
        self.leases.pop(name, None)

    @rule(image=images)
    def touch(self, image: bytes) -> None:
        self.store.touch(image)

    @rule(goal=st.one_of(st.none(), st.integers(0, 5000)), dry=st.booleans())
    def gc(self, goal: int | None, dry: bool) -> None:
        imgs_before, files_before = self.snapshot()
        report = self.store.gc(target_bytes=goal, dry_run=dry)
        files_after = self.snapshot()[1]
        assert files_after <= files_before  # GC only removes
        if dry:
            assert files_after == files_before
            return
        removed = files_before - files_after
        assert len(removed) == report.removed_objects
        assert set(report.removed_images).isdisjoint(self.protected())
        if goal is None and self.cap is None:
            # full collection: exactly the protected images and what they reference stay
            keep = {i for i in self.protected() if i in imgs_before}
            want = keep | {o for i in keep for o in self.refs[i]}
            assert files_after == want & files_before

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = Store(self.dir / "s", size_cap=self.cap, image_parser=fake_parser, fsync=False)
        assert self.store.leases() == {h: s for h, s in self.leases.items() if s}

    # -- the invariant -------------------------------------------------------------------

    @invariant()
    def leased_content_stays(self) -> None:
        """Whatever a leased image had in the store after one step is still there after the
        next (the image file, its link and every object of it that was present)."""
        if not hasattr(self, "store"):
            return
        owed: dict[bytes, set[bytes]] = getattr(self, "_owed", {})
        leased = self.protected()
        for img, objs in owed.items():
            if img not in leased:
                continue
            assert self.store.has_image(img), img.hex()
            for o in objs:
                assert self.store.has_object(o), (img.hex(), o.hex())
        self._owed = {
            img: {o for o in self.refs[img] if self.store.has_object(o)}
            for img in leased
            if img in self.refs and self.store.has_image(img)
        }


GcMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestGcProperty = GcMachine.TestCase
