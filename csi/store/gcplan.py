"""Choosing what garbage collection removes (pure: no I/O, so it can be tested alone).

Rules: a protected image (leased or pinned) is never removed, and neither is any object a
remaining image references. Objects no image references go first (they cost nothing to
lose), then unprotected images least recently used first, each freeing its own file and the
objects only it referenced. With no target everything unprotected goes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Set
from dataclasses import dataclass, field


@dataclass
class GcPlan:
    images: list[bytes] = field(default_factory=list)  # in removal order
    objects: set[bytes] = field(default_factory=set)  # files to delete (image files included)
    freed: int = 0


def plan_gc(
    *,
    sizes: Mapping[bytes, int],
    images: Mapping[bytes, float],
    refs: Mapping[bytes, Set[bytes]],
    protected: Set[bytes],
    target: int | None,
) -> GcPlan:
    """``sizes``: every stored file (objects and images) -> size. ``images``: recorded image ->
    last-used time. ``refs``: image -> objects it references. ``protected``: image digests
    that must stay. ``target``: bytes to free (None: as much as possible)."""
    plan = GcPlan()
    refcount: Counter[bytes] = Counter()
    for img in images:
        refcount.update(refs.get(img, ()))
    remaining_images = set(images)

    def removable(d: bytes) -> bool:
        return d in sizes and refcount[d] == 0 and d not in remaining_images

    for d, size in sizes.items():
        if removable(d):
            plan.objects.add(d)
            plan.freed += size
    candidates = sorted(
        (img for img in images if img not in protected), key=lambda i: (images[i], i)
    )
    for img in candidates:
        if target is not None and plan.freed >= target:
            break
        plan.images.append(img)
        remaining_images.discard(img)
        for o in refs.get(img, ()):
            refcount[o] -= 1
            if removable(o) and o not in plan.objects:
                plan.objects.add(o)
                plan.freed += sizes[o]
        if removable(img) and img not in plan.objects:
            plan.objects.add(img)
            plan.freed += sizes[img]
    return plan
