"""Layer tars from entry specs, generated layered images, and OCI layouts written by hand (for
the OCI import tests and the benchmark)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- layer tars --------------------------------------------------------------------------------


@dataclass
class E:
    """One tar entry. ``kind``: dir, file, symlink, hardlink, chr, blk, fifo, whiteout, opaque.

    ``path`` is the entry name as written (``./`` for the root); ``target`` is a symlink's or
    hard link's target; whiteouts are written as ``DIR/.wh.NAME`` (``path`` = ``DIR/NAME``) and
    opaque markers as ``DIR/.wh..wh..opq`` (``path`` = ``DIR``).
    """

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: float | str = 1_700_000_000
    target: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


_KINDS = {
    "dir": tarfile.DIRTYPE,
    "file": tarfile.REGTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def layer_tar(entries: list[E], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An uncompressed layer tar of ``entries``, in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for e in entries:
            name = e.path
            kind = e.kind
            if kind == "whiteout":
                d, _, base = e.path.rpartition("/")
                name, kind = (f"{d}/" if d else "") + ".wh." + base, "file"
            elif kind == "opaque":
                name, kind = (f"{e.path}/" if e.path else "") + ".wh..wh..opq", "file"
            ti = tarfile.TarInfo(name)
            ti.type = _KINDS[kind]
            ti.mode = (
                e.mode if e.mode is not None else {"dir": 0o755, "symlink": 0o777}.get(kind, 0o644)
            )
            ti.uid, ti.gid = e.uid, e.gid
            ti.uname = ti.gname = ""
            pax: dict[str, str] = {}
            if isinstance(e.mtime, str):
                ti.mtime = int(float(e.mtime))
                pax["mtime"] = e.mtime
            else:
                ti.mtime = e.mtime  # type: ignore[assignment]
            for k, v in e.xattrs.items():
                pax["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
            if pax:
                ti.pax_headers = pax
            if kind in ("symlink", "hardlink"):
                ti.linkname = e.target
            if kind in ("chr", "blk"):
                ti.devmajor, ti.devminor = e.dev
            data = e.data if kind == "file" else b""
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return out.getvalue()


def blob_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- generated layered images ----------------------------------------------------------------------


def random_layers(seed: int, n_layers: int = 3, *, cross_layer_links: bool = True) -> list[list[E]]:
    """Layers (lowest first) using every entry kind the importer must handle, whose later
    layers replace, delete (``.wh.``), empty (``.wh..wh..opq``), write through symlinked
    directories and hard-link to files of their own and (``cross_layer_links``) lower layers.

    Every directory an entry needs is named by an entry of its own (no implicit parents: umoci
    gives those the time of the unpack)."""
    rng = random.Random(seed)
    kinds: dict[str, str] = {}  # path -> kind, for the flattened tree after each layer
    born: dict[str, int] = {}  # path -> layer that wrote it
    counter = iter(range(10**9))

    def fresh(prefix: str) -> str:
        return f"{prefix}{next(counter)}"

    def meta(kind: str) -> dict[str, Any]:
        m: dict[str, Any] = {
            "uid": rng.choice([0, 0, 1000, 65534, 70000]),
            "gid": rng.choice([0, 0, 100, 70001]),
            "mtime": rng.choice(
                [1_700_000_000, 1_700_000_123, "1700000000.123456789", "1699999999.5"]
            ),
        }
        if kind == "dir":
            m["mode"] = rng.choice([0o755, 0o755, 0o700, 0o1777, 0o2755])
        elif kind == "file":
            m["mode"] = rng.choice([0o644, 0o600, 0o755, 0o4755, 0o640])
        elif kind == "symlink":
            m["mode"] = rng.choice([0o777, 0o755])  # shown as 0777 whatever the header says
        if kind in ("dir", "file") and rng.random() < 0.3:  # (no user.* on symlinks)
            m["xattrs"] = {"user.k" + str(rng.randrange(3)): rng.randbytes(rng.randrange(0, 30))}
            if rng.random() < 0.3:
                m["xattrs"]["trusted.t"] = b"trusted value"
        return m

    def dirs() -> list[str]:
        return [p for p, k in kinds.items() if k == "dir"]

    def children(d: str) -> list[str]:
        pre = d + "/" if d else ""
        return [p for p in kinds if p.startswith(pre) and p != d and "/" not in p[len(pre) :]]

    def remove(path: str) -> None:
        for p in [p for p in kinds if p == path or p.startswith(path + "/")]:
            del kinds[p]
            born.pop(p, None)

    def file_entry(path: str, layer: int) -> E:
        size = rng.choice([0, 1, 17, 64, 65, 4096, 4097, 70000, 200000])
        kinds[path] = "file"
        born[path] = layer
        return E(path, "file", data=rng.randbytes(size), **meta("file"))

    layers: list[list[E]] = []
    for k in range(n_layers):
        out: list[E] = []
        if k == 0:
            out.append(E("./", "dir", mode=0o755, mtime=1_700_000_000))
            kinds[""] = "dir"
            for _ in range(4):
                parent = rng.choice(dirs())
                d = f"{parent}/{fresh('d')}".lstrip("/")
                out.append(E(d, "dir", **meta("dir")))
                kinds[d] = "dir"
        ops = 30 if k == 0 else 18
        for _ in range(ops):
            r = rng.random()
            ds = dirs()
            parent = rng.choice(ds)
            pre = parent + "/" if parent else ""
            if parent and rng.random() < 0.5:
                out.append(E(parent, "dir", **meta("dir")))  # the parent's entry, as tools write
            if r < 0.35:
                out.append(file_entry(pre + fresh("f"), k))
            elif r < 0.45:
                d = pre + fresh("d")
                out.append(E(d, "dir", **meta("dir")))
                kinds[d] = "dir"
                out.append(file_entry(d + "/" + fresh("f"), k))
            elif r < 0.52:
                target = rng.choice(["../x", "/etc/passwd", "dangling", parent or "."])
                p = pre + fresh("l")
                out.append(E(p, "symlink", target=target, **meta("symlink")))
                kinds[p] = "symlink"
            elif r < 0.58:
                # A symlink to a directory, and an entry written through it.
                others = [d for d in ds if d and not d.startswith(parent + "/") and d != parent]
                if not others:
                    continue
                target_dir = rng.choice(others)
                link = pre + fresh("ld")
                out.append(E(link, "symlink", target="/" + target_dir))
                kinds[link] = "symlink"
                name = fresh("via")
                out.append(file_entry(f"{link}/{name}", k))
                del kinds[f"{link}/{name}"]
                born.pop(f"{link}/{name}")
                kinds[f"{target_dir}/{name}"] = "file"
                born[f"{target_dir}/{name}"] = k
            elif r < 0.66:
                files = [
                    p
                    for p, kd in kinds.items()
                    if kd == "file" and (cross_layer_links or born.get(p) == k)
                ]
                if not files:
                    continue
                p = pre + fresh("h")
                out.append(E(p, "hardlink", target=rng.choice(files)))
                kinds[p] = "file"
                born[p] = k
            elif r < 0.72 and k == 0:
                p = pre + fresh("dev")
                kind = rng.choice(["chr", "blk", "fifo"])
                dev = rng.choice([(1, 3), (4, 300), (7, 0), (254, 70000)])
                out.append(E(p, kind, dev=dev, mode=0o660, uid=rng.choice([0, 6])))
                kinds[p] = kind
            elif k > 0 and r < 0.8:
                # Delete something (a whole directory sometimes).
                victims = [p for p in kinds if p]
                if not victims:
                    continue
                victim = rng.choice(victims)
                vparent = victim.rpartition("/")[0]
                if kinds.get(vparent) != "dir":
                    continue
                out.append(E(victim, "whiteout"))
                remove(victim)
                if rng.random() < 0.3:  # and write it again in the same layer
                    out.append(file_entry(victim, k))
            elif k > 0 and r < 0.87:
                # Empty a directory, then give it new contents.
                full = [d for d in ds if d and children(d)]
                if not full:
                    continue
                d = rng.choice(full)
                new = file_entry(d + "/" + fresh("n"), k)
                if rng.random() < 0.5:
                    out += [E(d, "opaque"), new]
                    for c in children(d):
                        if c != new.path:
                            remove(c)
                else:
                    out += [new, E(d, "opaque")]  # the marker after this layer's own entries
                    for c in children(d):
                        if c != new.path:
                            remove(c)
            elif k > 0 and r < 0.93:
                # Replace a file with a directory, or a directory with a file.
                cands = [p for p in kinds if p and kinds[p] in ("file", "dir")]
                if not cands:
                    continue
                p = rng.choice(cands)
                if kinds[p] == "file":
                    remove(p)
                    out.append(E(p, "dir", **meta("dir")))
                    kinds[p] = "dir"
                    out.append(file_entry(p + "/" + fresh("f"), k))
                else:
                    remove(p)
                    out.append(file_entry(p, k))
            else:
                files = [p for p, kd in kinds.items() if kd == "file"]
                if files:
                    out.append(file_entry(rng.choice(files), k))  # new content, same name
        layers.append(out)
    return layers


# -- OCI layouts written by hand (for what the tools refuse to make) ------------------------


class Layout:
    """An OCI image layout under construction: blobs, manifests, tags."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.entries: list[dict[str, Any]] = []
        self._save()

    def _save(self) -> None:
        doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": self.entries}  # fmt: skip
        (self.root / "index.json").write_text(json.dumps(doc))

    def blob(self, data: bytes) -> dict[str, Any]:
        """Store ``data``; its descriptor (without a media type)."""
        h = sha256_hex(data)
        (self.root / "blobs" / "sha256" / h).write_bytes(data)
        return {"digest": f"sha256:{h}", "size": len(data)}

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.split(":", 1)[1]

    def image(
        self,
        layers: list[bytes],
        *,
        compression: str = "gzip",
        diff_ids: list[str] | None = None,
        platform: tuple[str, str] = ("linux", "amd64"),
    ) -> dict[str, Any]:
        """An image manifest of ``layers`` (uncompressed tars); its descriptor."""
        descs = []
        for data in layers:
            if compression == "gzip":
                import gzip

                blob, mt = gzip.compress(data, mtime=0), "tar+gzip"
            elif compression == "zstd":
                import zstandard

                blob, mt = zstandard.ZstdCompressor().compress(data), "tar+zstd"
            else:
                blob, mt = data, "tar"
            descs.append(
                {"mediaType": f"application/vnd.oci.image.layer.v1.{mt}", **self.blob(blob)}
            )
        config = {
            "architecture": platform[1],
            "os": platform[0],
            "rootfs": {"type": "layers",
                       "diff_ids": diff_ids or [f"sha256:{sha256_hex(d)}" for d in layers]},
        }  # fmt: skip
        cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                 **self.blob(json.dumps(config).encode())}  # fmt: skip
        return self.manifest({"config": cdesc, "layers": descs})

    def manifest(self, body: dict[str, Any]) -> dict[str, Any]:
        doc = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            **body,
        }
        return {"mediaType": doc["mediaType"], **self.blob(json.dumps(doc).encode())}

    def index(self, entries: list[tuple[dict[str, Any], tuple[str, str] | None]]) -> dict[str, Any]:
        items = []
        for desc, plat in entries:
            item = dict(desc)
            if plat is not None:
                item["platform"] = {"os": plat[0], "architecture": plat[1]}
            items.append(item)
        doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": items}  # fmt: skip
        return {"mediaType": doc["mediaType"], **self.blob(json.dumps(doc).encode())}

    def tag(self, tag: str, desc: dict[str, Any]) -> str:
        entry = {**desc, "annotations": {"org.opencontainers.image.ref.name": tag}}
        self.entries = [e for e in self.entries if e.get("annotations", {}).get(
            "org.opencontainers.image.ref.name") != tag] + [entry]  # fmt: skip
        self._save()
        return f"oci:{self.root}:{tag}"
