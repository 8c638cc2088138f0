"""The container image's dependency lock (requirements/image.txt, written by
scripts/lock-deps.sh) still satisfies pyproject.toml, and the Dockerfile builds from it."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "image.txt"

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def parse_lock(text: str) -> dict[str, tuple[Version, int]]:
    """{canonical name: (pinned version, number of hashes)} of a pip-compile output."""
    pins: dict[str, tuple[Version, int]] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        m = _PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            assert current not in pins, f"{current} pinned twice"
            pins[current] = (Version(m.group(2)), 0)
        elif line.startswith("--hash=sha256:") and current is not None:
            version, n = pins[current]
            assert re.fullmatch(r"--hash=sha256:[0-9a-f]{64}( \\)?", line), line
            pins[current] = (version, n + 1)
        elif line and not line.startswith("#"):
            current = None
    return pins


def test_parse_lock_reads_pins_and_hashes() -> None:
    text = (
        "Foo_Bar==1.2 \\\n    --hash=sha256:"
        + "a" * 64
        + " \\\n    --hash=sha256:"
        + "b" * 64
        + "\n    # via x\nbaz==3.0 \\\n    --hash=sha256:"
        + "c" * 64
        + "\n"
    )
    assert parse_lock(text) == {"foo-bar": (Version("1.2"), 2), "baz": (Version("3.0"), 1)}


def test_lock_satisfies_pyproject_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = parse_lock(LOCK.read_text())
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {LOCK.name}: run scripts/lock-deps.sh"
        version, _ = pins[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"{LOCK.name} pins {name}=={version}, outside {req.specifier}: run scripts/lock-deps.sh"
        )
    unhashed = sorted(n for n, (_, hashes) in pins.items() if hashes == 0)
    assert not unhashed, f"pins without hashes: {unhashed}"
    # Build-time tools have no business in the runtime venv.
    assert not {"pip", "setuptools", "wheel"} & pins.keys()


def test_dockerfile_builds_from_the_lock() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "COPY requirements/image.txt" in text
    # Every pin but pyfuse3's (the patched wheel of scripts/build-pyfuse3.sh replaces it), with
    # its hashes: the Dockerfile's own awk program, run on the lock, drops exactly that entry.
    m = re.search(r"RUN awk '([^']+)' \\\n\s+requirements/image\.txt > (\S+)", text)
    assert m, "the Dockerfile no longer derives its pip input from requirements/image.txt"
    program, derived = m.group(1), m.group(2)
    assert re.search(rf"pip wheel [^\n]*--require-hashes[^\n]*-r {re.escape(derived)}", text)
    out = subprocess.run(["awk", program, str(LOCK)], capture_output=True, text=True, check=True)
    full, without = parse_lock(LOCK.read_text()), parse_lock(out.stdout)
    assert set(full) - set(without) == {"pyfuse3"} and all(without[n] == full[n] for n in without)
    assert "scripts/build-pyfuse3.sh" in text
    # The package's own wheel must not resolve dependencies again (they come from the lock).
    assert re.search(r"pip wheel [^\n]*--no-deps[^\n]* \.( \\)?\n", text)
    # And .dockerignore lets the lock into the build context.
    assert "!requirements/image.txt" in (REPO / ".dockerignore").read_text().splitlines()
