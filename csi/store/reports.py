"""Reports returned by the store: usage, GC, fsck, start-up recovery."""

from __future__ import annotations

from dataclasses import dataclass, field


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass
class StoreUsage:
    bytes: int
    files: int  # objects and images
    images: int
    lease_holders: int
    leased_images: int
    pinned_images: int
    verity_files: int
    size_cap: int | None = None

    def __str__(self) -> str:
        cap = f" of {human_bytes(self.size_cap)} cap" if self.size_cap else ""
        return (
            f"{human_bytes(self.bytes)}{cap} in {self.files} files ({self.images} images); "
            f"{self.lease_holders} lease holders on {self.leased_images} images; "
            f"{self.pinned_images} pinned; fs-verity on {self.verity_files} files"
        )


@dataclass
class GcReport:
    dry_run: bool
    target_bytes: int | None
    bytes_before: int
    removed_images: list[bytes] = field(default_factory=list)
    removed_objects: int = 0  # files, image files included
    freed_bytes: int = 0
    protected_images: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def bytes_after(self) -> int:
        return self.bytes_before - self.freed_bytes

    def __str__(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        goal = "" if self.target_bytes is None else f" (goal {human_bytes(self.target_bytes)})"
        lines = [
            f"gc: {verb} {human_bytes(self.freed_bytes)}{goal}: {len(self.removed_images)} "
            f"images, {self.removed_objects} files; {self.protected_images} images kept "
            f"(leased or in use); store {human_bytes(self.bytes_before)} -> "
            f"{human_bytes(self.bytes_after)}"
        ]
        lines += [f"  removed image {d.hex()}" for d in self.removed_images]
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)


@dataclass
class FsckReport:
    repair: bool
    checked: int = 0
    bytes_checked: int = 0
    #: (relative path, problem)
    bad: list[tuple[str, str]] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    removed_records: int = 0
    fixed_links: int = 0
    #: Leaks of dead processes: pins, and temp files (count, bytes) still there when fsck
    #: started; temp files the store's start-up recovery removed just before.
    stale_pins: int = 0
    leaked_temp_files: int = 0
    leaked_temp_bytes: int = 0
    temp_removed_at_open: int = 0

    @property
    def ok(self) -> bool:
        """No bad file, and no leak left behind (leaks found are removed when repairing)."""
        return not self.bad and (self.repair or not (self.stale_pins or self.leaked_temp_files))

    def __str__(self) -> str:
        head = f"fsck: checked {self.checked} files ({human_bytes(self.bytes_checked)}): " + (
            f"{len(self.bad)} bad" if self.bad else "all good"
        )
        lines = [head]
        lines += [f"  {p}: {why}" for p, why in self.bad]
        if self.quarantined:
            lines.append(f"  moved {len(self.quarantined)} file(s) to quarantine/")
        if self.removed_records:
            lines.append(f"  dropped {self.removed_records} stale state record(s)")
        if self.fixed_links:
            lines.append(f"  repaired {self.fixed_links} image link(s)")
        done = "removed" if self.repair else "left"
        if self.stale_pins:
            lines.append(f"  leak: {self.stale_pins} pin(s) of dead processes ({done})")
        if self.leaked_temp_files:
            lines.append(
                f"  leak: {self.leaked_temp_files} temp file(s) of dead processes, "
                f"{human_bytes(self.leaked_temp_bytes)} ({done})"
            )
        if self.temp_removed_at_open:
            lines.append(
                f"  leak: {self.temp_removed_at_open} temp file(s) of dead processes removed "
                "when the store was opened"
            )
        if not self.ok and not self.repair:
            lines.append("  (not repaired: run without --no-repair to quarantine and remove them)")
        return "\n".join(lines)


@dataclass
class RecoveryReport:
    temp_removed: int = 0
    recorded_unknown: int = 0
    dropped_missing: int = 0
    images_recorded: int = 0
    images_dropped: int = 0
    links_fixed: int = 0
    #: leases whose image is no longer in the store: (holder, image)
    leases_on_missing: list[tuple[str, bytes]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = (
            f"recovery: {self.temp_removed} temp files removed, {self.recorded_unknown} "
            f"unrecorded files recorded ({self.images_recorded} images), "
            f"{self.dropped_missing} records of missing files dropped "
            f"({self.images_dropped} images), {self.links_fixed} links fixed"
        )
        for holder, img in self.leases_on_missing:
            s += f"\n  lease {holder!r} names image {img.hex()}, which is not in the store"
        for p in self.problems:
            s += f"\n  {p}"
        return s
