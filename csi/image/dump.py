"""The composefs-dump text format, both ways.

:func:`parse_dump` reads what ``mkcomposefs --from-file`` reads (composefs 1.0.8) and
rejects what it rejects; :func:`format_dump` prints what ``composefs-info dump`` prints
for the image of a tree (when the tree comes from reading an image).

Input rules (mkcomposefs 1.0.8, checked against the tool)
---------------------------------------------------------
- Lines are split at ``\\n``. A last line without a newline is accepted, except in
  ``strict`` mode (mkcomposefs' ``CFS_PARSE_STRICT``). An empty line is an error (empty
  path), and so is an empty input. A NUL byte anywhere in a line is an error.
- The first eleven fields are split at single spaces; missing trailing fields are empty
  strings (not ``-``). Whatever follows the eleventh field is the xattr list, split at
  single spaces (one trailing space is harmless, two make an empty xattr: an error). It
  may be at most 65535 bytes long.
- Integers are parsed like C ``strtoull``: leading whitespace (tab, CR, VT, FF), a sign,
  overflow saturating at 2^64-1, negative values wrapping. Results are then truncated as
  libcomposefs stores them: mode, nlink, uid, gid and rdev to 32 bits, mtime seconds to
  a signed 64-bit value, nanoseconds to 32 bits (so ``1.4294967297`` is 1 s + 1 ns and
  ``-1.5`` is a valid time).
- A quirk kept on purpose: when UID is not 0, a malformed GID or RDEV is silently read
  as 0 (mkcomposefs tests the wrong variable).
- Escapes: ``\\\\ \\n \\r \\t \\xHH`` (either case of hex); anything else after ``\\``
  is an error. Fields used as C strings (path, payload, xattr key, digest) end at the
  first unescaped ``\\x00``; contents and xattr values keep NULs.
- ``-`` alone means "absent" for PAYLOAD, CONTENT and DIGEST. An empty field is present
  but empty: an empty CONTENT is fine for a 0-byte file, an empty PAYLOAD means none.
- PATH: leading and repeated ``/`` are ignored (``a`` is ``/a``); a trailing ``/`` is an
  error; ``.``/``..`` components, empty or > 255-byte names are errors; parents must
  already exist and be directories; the exact path ``/`` is the root, which must be a
  directory, must come first and only once.
- Hard links (MODE prefixed with ``@``): only PATH, MODE (a valid, non-directory type)
  and PAYLOAD (the target path, resolved like PATH after every line has been read, so it
  may refer to a later line; chains of links are followed) are looked at. A link to
  itself or a cycle is an error. The target keeps its own NLINK.
- SIZE is ignored for directories; for symlinks the target length wins (strict mode:
  must be equal, and CONTENT must be empty). RDEV is kept only for chr/blk devices
  (strict mode: must be 0 otherwise). CONTENT must be exactly SIZE bytes and at most 5000.
  A regular file without CONTENT needing more than 1024 chunks of 2^43 bytes (SIZE >
  2^53) is rejected, except that libcomposefs' chunk count wraps around for SIZE within
  2^43 of 2^64, which it accepts (and so do we).
- Symlinks need a non-empty target shorter than 4096 bytes; a regular file's PAYLOAD
  must be shorter than 4096 bytes.
- Xattrs: ``KEY=VALUE`` split at the first ``=`` (an escaped ``\\x3d`` is not a
  separator); key 1..255 bytes, value at most 65535; a repeated key replaces the earlier
  value; per inode the sum of ``7 + len(key) + len(value)`` plus 12 must stay within
  32767 bytes (``LCFS_INODE_EXTERNAL_XATTR_MAX``).

Deliberate differences from mkcomposefs 1.0.8
---------------------------------------------
- A hard link to a directory (including ``/``) is rejected. mkcomposefs accepts it (its
  check is dead code) and writes a directory dirent shared by two names.
- A DIGEST that is not at least 64 hex digits on an external regular file is rejected:
  mkcomposefs would put uninitialised memory in the metacopy xattr. On any other node
  the digest is unused by mkcomposefs, so a malformed one is accepted and dropped. Past
  64 hex digits mkcomposefs ignores the rest, and so do we.
- Writer failures caused by mkcomposefs' xattr accounting bug after cloning (quirk Q2 in
  the format notes, e.g. a whiteout that already has ``user.overlay.whiteout`` and other
  xattrs) are not reproduced: such dumps parse.

The resulting nodes keep the fields as given, except: symlink ``size`` = target length;
``rdev`` = 0 except on devices; PAYLOAD is kept only on regular files (as backing path,
``None`` if empty) and symlinks (as target); CONTENT only on regular files (``None`` if
empty); DIGEST only on regular files. Directory SIZE and NLINK are kept as given; the
image writer recomputes them.

What ``composefs-info dump`` prints (composefs 1.0.8, checked against the tool)
------------------------------------------------------------------------------
- Depth-first pre-order, children sorted by name; ``.``/``..`` are not printed.
- The 256 ``00``..``ff`` whiteout stubs (and any real chr 0/0 inode) are not printed.
  A user whiteout (stored escaped, as a regular file with
  ``trusted.overlay.overlay.whiteout``) is printed as what it was: a character device,
  mode ``020000 | permissions``, size 0, rdev 0.
- Overlay xattrs: ``trusted.overlay.metacopy``, ``trusted.overlay.redirect``, root's
  ``trusted.overlay.opaque=y`` and every other unescaped ``trusted.overlay.*`` are not
  printed; ``trusted.overlay.overlay.X`` is printed as ``trusted.overlay.X``;
  ``user.overlay.whiteout`` and ``user.overlay.whiteouts`` are not printed, on any node
  (:func:`format_dump` does not print them either, even when a tree carries them).
  On a format-1 image, a directory holding whiteouts therefore shows
  ``trusted.overlay.opaque=x user.overlay.opaque=x`` (written by mkcomposefs).
- Xattrs are printed in image order: the inode's inline xattrs (sorted by key), then its
  shared ones (in key order too), so not necessarily sorted overall.
- Directories: SIZE is the EROFS directory size (e.g. 27 for an empty one, 4096 for a
  root with its stubs), NLINK is what the writer computed, 2 + number of subdirectories.
- Compact inodes carry no mtime: they print the image build time (minimum mtime).
- Regular files: inline files print CONTENT and no digest; external files print the
  redirect (without its leading ``/``) as PAYLOAD and the metacopy digest, if any.
  mkcomposefs' reader strips the ``/`` with an off-by-one (quirk Q1) and may print a
  byte or more of garbage after the payload; :func:`format_dump` prints the true payload.
- Hard links: the first name met in this depth-first order is printed in full; every
  other name is an ``@`` line that repeats all of the target's fields (including its
  digest) with PAYLOAD = the absolute path of that first name. That first name is not
  necessarily the writer's primary (which is the first in breadth-first order).
- Numbers: mode octal, others decimal; mtime as signed seconds ``.`` unpadded
  nanoseconds.
- Escaping: ``\\`` ``\\n`` ``\\r`` ``\\t`` as such, every byte outside 0x21..0x7e as
  ``\\xHH`` (lowercase, so a space is ``\\x20``), ``=`` as ``\\x3d`` in xattr keys and
  values only, a PAYLOAD or CONTENT that is exactly ``-`` as ``\\x2d``, an absent one
  as ``-``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DumpError
from .tree import (
    DIGEST_SIZE,
    FILE_TYPES,
    INLINE_CONTENT_MAX,
    NAME_MAX,
    PATH_MAX,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    XATTR_NAME_MAX,
    XATTR_VALUE_MAX,
    HardLink,
    Node,
    Tree,
    resolve,
)

__all__ = ["escape", "format_dump", "parse_dump", "unescape"]

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
#: Per-inode budget for xattrs read from a dump (libcomposefs LCFS_INODE_EXTERNAL_XATTR_MAX).
EXTERNAL_XATTR_MAX = 0xFFFF // 2
_XATTR_ENTRY_OVERHEAD = 7  # 2 * sizeof(erofs_xattr_entry) - 1
_XATTR_HEADER_SIZE = 12
#: Longest xattr list of one line (mkcomposefs: "Too many xattrs").
_XATTR_TEXT_MAX = 0xFFFF
#: External regular files may span at most this many chunks (LCFS_MAX_NONINLINE_CHUNKS).
_MAX_CHUNKS = 1024
_NFIELDS = 11
#: composefs-info never prints these (its image loader drops them on every inode).
_HIDDEN_XATTRS = frozenset({b"user.overlay.whiteout", b"user.overlay.whiteouts"})
_C_SPACE = b" \t\n\v\f\r"
_HEX = b"0123456789abcdefABCDEF"


# --------------------------------------------------------------------------- escaping


def unescape(field: bytes) -> bytes:
    """Undo dump escaping. Raises :class:`ValueError` on a malformed escape."""
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    n = len(field)
    while i < n:
        j = field.find(b"\\", i)
        if j < 0:
            out += field[i:]
            break
        out += field[i:j]
        if j + 1 >= n:
            raise ValueError("no character after escape")
        c = field[j + 1]
        if c == 0x5C:
            out.append(0x5C)
        elif c == 0x6E:
            out.append(0x0A)
        elif c == 0x72:
            out.append(0x0D)
        elif c == 0x74:
            out.append(0x09)
        elif c == 0x78:
            hx = field[j + 2 : j + 4]
            if len(hx) < 2:
                raise ValueError("no hex characters after hex escape")
            if hx[0] not in _HEX or hx[1] not in _HEX:
                raise ValueError("invalid hex characters after hex escape")
            out.append(int(hx, 16))
            i = j + 4
            continue
        else:
            raise ValueError(f"unsupported escape \\{chr(c)}")
        i = j + 2
    return bytes(out)


def _escape_table(escape_equal: bool) -> list[bytes]:
    table = []
    for c in range(256):
        if c == 0x5C:
            table.append(b"\\\\")
        elif c == 0x0A:
            table.append(b"\\n")
        elif c == 0x0D:
            table.append(b"\\r")
        elif c == 0x09:
            table.append(b"\\t")
        elif (c == 0x3D and escape_equal) or not 0x21 <= c <= 0x7E:
            table.append(b"\\x%02x" % c)
        else:
            table.append(bytes([c]))
    return table


_ESC_STD = _escape_table(False)
_ESC_EQ = _escape_table(True)
_PLAIN_STD = frozenset(c for c in range(256) if len(_ESC_STD[c]) == 1)
_PLAIN_EQ = frozenset(c for c in range(256) if len(_ESC_EQ[c]) == 1)


def escape(value: bytes, *, equal: bool = False, lone_dash: bool = False) -> bytes:
    """Escape as composefs-info's ``print_escaped`` does.

    ``equal``: also escape ``=`` (xattr keys and values). ``lone_dash``: a value that is
    exactly ``-`` becomes ``\\x2d`` (optional fields, where ``-`` means absent).
    """
    if lone_dash and value == b"-":
        return b"\\x2d"
    plain = _PLAIN_EQ if equal else _PLAIN_STD
    if all(c in plain for c in value):
        return value
    table = _ESC_EQ if equal else _ESC_STD
    return b"".join([table[c] for c in value])


# --------------------------------------------------------------------------- parsing


def _strtoull(s: bytes, base: int) -> int | None:
    """C ``strtoull`` over a whole field: ``None`` unless every byte was consumed."""
    i = 0
    n = len(s)
    while i < n and s[i] in _C_SPACE:
        i += 1
    neg = False
    if i < n and s[i] in b"+-":
        neg = s[i] == 0x2D
        i += 1
    start = i
    limit = 0x30 + base
    while i < n and 0x30 <= s[i] < limit:
        i += 1
    if i == start or i != n:
        return None
    v = int(s[start:i], base)
    if v > _U64:
        return _U64
    return (-v) & _U64 if neg else v


def _cstr(b: bytes) -> bytes:
    """A C string ends at its first NUL."""
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _split_components(path: bytes) -> list[bytes]:
    return [c for c in path.split(b"/") if c]


@dataclass(eq=False, slots=True)
class _Pending:
    """A hard link line, resolved once every line has been read."""

    target_path: bytes | None
    lineno: int
    resolved: Node | None = None


class _Parser:
    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.root: Node | None = None
        # Directory entries while parsing: Node or _Pending (not yet a HardLink).
        self.entries: dict[int, dict[bytes, Node | _Pending]] = {}
        self.pending: list[_Pending] = []
        self.xattr_budget: dict[int, int] = {}

    # -- one line -------------------------------------------------------------

    def line(self, lineno: int, line: bytes) -> None:
        nul = line.find(b"\0")
        if nul >= 0:
            raise DumpError(f"line {lineno}: embedded NUL at position {nul}")
        fields: list[bytes] = []
        rest = line
        for _ in range(_NFIELDS):
            sp = rest.find(b" ")
            if sp < 0:
                fields.append(rest)
                rest = b""
            else:
                fields.append(rest[:sp])
                rest = rest[sp + 1 :]
        (
            f_path,
            f_size,
            f_mode,
            f_nlink,
            f_uid,
            f_gid,
            f_rdev,
            f_mtime,
            f_payload,
            f_content,
            f_digest,
        ) = fields

        path = _cstr(self._unescape(lineno, "PATH", f_path))
        if not path:
            raise DumpError(f"line {lineno}: empty path")
        is_link = f_mode.startswith(b"@")
        if is_link:
            f_mode = f_mode[1:]
        mode = self._int(lineno, "MODE", f_mode, 8) & _U32
        if mode & S_IFMT not in FILE_TYPES:
            raise DumpError(f"line {lineno}: invalid mode {mode:o}")

        if is_link:
            if mode & S_IFMT == S_IFDIR:
                raise DumpError(f"line {lineno}: directories can't be hard links")
            target = self._optional(lineno, "PAYLOAD", f_payload)
            pending = _Pending(None if target is None else _cstr(target), lineno)
            self._add(lineno, path, pending, is_dir=False)
            self.pending.append(pending)
            return

        size = self._int(lineno, "SIZE", f_size, 10)
        nlink = self._int(lineno, "NLINK", f_nlink, 10) & _U32
        uid = self._int(lineno, "UID", f_uid, 10) & _U32
        if uid == 0:
            gid = self._int(lineno, "GID", f_gid, 10) & _U32
            rdev = self._int(lineno, "RDEV", f_rdev, 10) & _U32
        else:  # mkcomposefs quirk: a bad GID/RDEV reads as 0 when UID != 0
            gid = (_strtoull(f_gid, 10) or 0) & _U32
            rdev = (_strtoull(f_rdev, 10) or 0) & _U32
        sec_s, dot, nsec_s = f_mtime.partition(b".")
        sec = self._int(lineno, "MTIME", sec_s, 10)
        nsec = self._int(lineno, "MTIME", nsec_s if dot else b"", 10)
        if sec >= 1 << 63:
            sec -= 1 << 64
        nsec &= _U32

        payload = self._optional(lineno, "PAYLOAD", f_payload)
        content = self._optional(lineno, "CONTENT", f_content)
        if content is not None and len(content) != size:
            raise DumpError(f"line {lineno}: content is {len(content)} bytes but SIZE is {size}")
        digest_s = self._optional(lineno, "DIGEST", f_digest)

        ftype = mode & S_IFMT
        node = Node(mode=mode, uid=uid, gid=gid, nlink=nlink, mtime_sec=sec, mtime_nsec=nsec)
        if ftype in (S_IFCHR, S_IFBLK):
            node.rdev = rdev
        elif self.strict and rdev != 0:
            raise DumpError(f"line {lineno}: non-zero RDEV on a non-device")

        if ftype == S_IFLNK:
            target = _cstr(payload) if payload is not None else b""
            if not target:
                raise DumpError(f"line {lineno}: symlink without a target")
            if len(target) >= PATH_MAX:
                raise DumpError(f"line {lineno}: symlink target longer than {PATH_MAX - 1}")
            if self.strict:
                if size != len(target):
                    raise DumpError(
                        f"line {lineno}: symlink SIZE {size} differs from target length"
                        f" {len(target)}"
                    )
                if content:
                    raise DumpError(f"line {lineno}: symlink cannot have content")
            node.payload = target
            node.size = len(target)
        else:
            node.size = size
            if payload is not None and len(_cstr(payload)) >= PATH_MAX:
                raise DumpError(f"line {lineno}: payload longer than {PATH_MAX - 1}")
            if content is not None and len(content) > INLINE_CONTENT_MAX:
                raise DumpError(
                    f"line {lineno}: inline content of {len(content)} bytes exceeds"
                    f" {INLINE_CONTENT_MAX}"
                )
            if ftype == S_IFREG:
                node.payload = (_cstr(payload) or None) if payload is not None else None
                node.content = content or None
                external = size > 0 and node.content is None
                if external and _c_chunk_count(size) > _MAX_CHUNKS:
                    raise DumpError(f"line {lineno}: file too big ({size} bytes)")
                if digest_s is not None:
                    node.digest = _parse_digest(_cstr(digest_s))
                    if node.digest is None and external:
                        raise DumpError(
                            f"line {lineno}: DIGEST must be 64 hex digits, got {digest_s!r}"
                        )

        if len(rest) > _XATTR_TEXT_MAX:
            raise DumpError(f"line {lineno}: too many xattrs ({len(rest)} bytes)")
        budget = 0
        while rest:
            sp = rest.find(b" ")
            if sp < 0:
                item, rest = rest, b""
            else:
                item, rest = rest[:sp], rest[sp + 1 :]
            budget = self._xattr(lineno, node, item, budget)

        self._add(lineno, path, node, is_dir=ftype == S_IFDIR)

    def _xattr(self, lineno: int, node: Node, item: bytes, budget: int) -> int:
        eq = item.find(b"=")
        if eq < 0:
            raise DumpError(f"line {lineno}: missing = in xattr {item!r}")
        key = _cstr(self._unescape(lineno, "xattr key", item[:eq]))
        value = self._unescape(lineno, "xattr value", item[eq + 1 :])
        if not 0 < len(key) <= XATTR_NAME_MAX:
            raise DumpError(f"line {lineno}: xattr key length {len(key)} not in 1..255")
        if len(value) > XATTR_VALUE_MAX:
            raise DumpError(f"line {lineno}: xattr {key!r} value longer than 65535")
        old = node.xattrs.pop(key, None)
        if old is not None:
            if node.xattrs:
                budget -= _XATTR_ENTRY_OVERHEAD + len(key) + len(old)
            else:
                budget = 0
        entry = _XATTR_ENTRY_OVERHEAD + len(key) + len(value)
        if not node.xattrs:
            entry += _XATTR_HEADER_SIZE
        if budget + entry > EXTERNAL_XATTR_MAX:
            raise DumpError(
                f"line {lineno}: xattrs exceed the per-inode limit of {EXTERNAL_XATTR_MAX}"
                f" bytes at {key!r}"
            )
        node.xattrs[key] = value
        return budget + entry

    def _add(self, lineno: int, path: bytes, item: Node | _Pending, *, is_dir: bool) -> None:
        if path == b"/":
            if not is_dir:
                raise DumpError(f"line {lineno}: the root must be a directory")
            if self.root is not None:
                raise DumpError(f"line {lineno}: a second root")
            assert isinstance(item, Node)
            self.root = item
            self.entries[id(item)] = {}
            return
        if self.root is None:
            raise DumpError(f"line {lineno}: the root must come first")
        # mkcomposefs: leading and repeated slashes are skipped; a trailing slash leaves
        # an empty name.
        stripped = path.lstrip(b"/")
        parent_path, _, name = stripped.rpartition(b"/")
        parent: Node | _Pending = self.root
        for comp in _split_components(parent_path):
            children = self.entries.get(id(parent))
            child = children.get(comp) if children is not None else None
            if child is None:
                raise DumpError(f"line {lineno}: parent directory missing for {path!r}")
            parent = child
        siblings = self.entries.get(id(parent))
        if siblings is None:
            raise DumpError(f"line {lineno}: parent of {path!r} is not a directory")
        if name in (b".", b".."):
            raise DumpError(f"line {lineno}: invalid . or .. in {path!r}")
        if not name or len(name) > NAME_MAX:
            raise DumpError(f"line {lineno}: name length {len(name)} not in 1..{NAME_MAX}")
        if name in siblings:
            raise DumpError(f"line {lineno}: {path!r} already exists")
        siblings[name] = item
        if is_dir:
            self.entries[id(item)] = {}

    def _lookup(self, path: bytes) -> Node | _Pending | None:
        assert self.root is not None
        cur: Node | _Pending = self.root
        for comp in _split_components(path):
            children = self.entries.get(id(cur))
            nxt = children.get(comp) if children is not None else None
            if nxt is None:
                return None
            cur = nxt
        return cur

    # -- after the last line --------------------------------------------------

    def finish(self) -> Tree:
        if self.root is None:
            raise DumpError("no files in dump")
        # mkcomposefs resolves the links in reverse order; keep its first error.
        for p in reversed(self.pending):
            if p.target_path is None:
                raise DumpError(f"line {p.lineno}: hard link without a target path")
            target = self._lookup(p.target_path)
            if target is None:
                raise DumpError(f"line {p.lineno}: no target at {p.target_path!r}")
            if target is p:
                raise DumpError(f"line {p.lineno}: hard link to itself")
        for p in self.pending:
            seen = {id(p)}
            cur: Node | _Pending | None = p
            while isinstance(cur, _Pending):
                cur = self._lookup(cur.target_path or b"")
                if isinstance(cur, _Pending):
                    if id(cur) in seen:
                        raise DumpError(f"line {p.lineno}: hard link cycle")
                    seen.add(id(cur))
            assert isinstance(cur, Node)
            if cur.is_dir:
                raise DumpError(f"line {p.lineno}: hard link to a directory ({p.target_path!r})")
            p.resolved = cur
        return Tree(self._build(self.root))

    def _build(self, root: Node) -> Node:
        stack = [root]  # iterative: dumps may nest thousands of levels
        while stack:
            d = stack.pop()
            assert d.entries is not None
            for name, item in self.entries[id(d)].items():
                if isinstance(item, _Pending):
                    assert item.resolved is not None
                    d.entries[name] = HardLink(item.resolved)
                else:
                    d.entries[name] = item
                    if item.is_dir:
                        stack.append(item)
        return root

    # -- field helpers ---------------------------------------------------------

    @staticmethod
    def _unescape(lineno: int, what: str, field: bytes) -> bytes:
        try:
            return unescape(field)
        except ValueError as e:
            raise DumpError(f"line {lineno}: {what}: {e}") from None

    def _optional(self, lineno: int, what: str, field: bytes) -> bytes | None:
        if field == b"-":
            return None
        return self._unescape(lineno, what, field)

    @staticmethod
    def _int(lineno: int, what: str, field: bytes, base: int) -> int:
        v = _strtoull(field, base)
        if v is None:
            raise DumpError(f"line {lineno}: {what}: invalid integer {field!r}")
        return v


def _c_chunk_count(size: int) -> int:
    """libcomposefs' chunk count, with its 64-bit wrap-around for sizes near 2^64."""
    bits = min(max((size - 1).bit_length(), 12), 43)
    return (((size + (1 << bits) - 1) & _U64) >> bits) & _U32


def _parse_digest(s: bytes) -> bytes | None:
    """mkcomposefs reads hex pairs and ignores what follows the 32nd byte."""
    if len(s) < 2 * DIGEST_SIZE:
        return None
    head = s[: 2 * DIGEST_SIZE]
    if any(c not in _HEX for c in head):
        return None
    return bytes.fromhex(head.decode())


def parse_dump(data: bytes, *, strict: bool = False) -> Tree:
    """Parse a composefs dump into a :class:`Tree`; :class:`DumpError` names the line."""
    parser = _Parser(strict)
    lines = data.split(b"\n")
    last = lines.pop()
    for i, line in enumerate(lines, 1):
        parser.line(i, line)
    if last:
        if strict:
            raise DumpError(f"line {len(lines) + 1}: missing trailing newline")
        parser.line(len(lines) + 1, last)
    return parser.finish()


# --------------------------------------------------------------------------- printing


def format_dump(tree: Tree, *, exact: bool = False) -> bytes:
    """The dump text of ``tree``, as ``composefs-info dump`` prints it (see module doc).

    With ``exact``, the text describes the tree itself rather than what composefs-info
    shows: each inode's full line is at its primary name (the one that places the inode in
    an image) and no xattr is hidden, so ``parse_dump(format_dump(t, exact=True))`` writes
    the same image as ``t``, with mkcomposefs as with us.
    """
    out: list[bytes] = []
    if exact:
        primary = tree.primary_paths()
        for path, entry in tree.walk():
            node = resolve(entry)
            link = primary[id(node)] if isinstance(entry, HardLink) else None
            out.append(_format_line(path, node, link, hide=False))
        return b"".join(out)
    first_path: dict[int, bytes] = {}
    for path, entry in tree.walk():
        node = resolve(entry)
        link_to = first_path.get(id(node))
        if link_to is None and not node.is_dir:
            first_path[id(node)] = path
        out.append(_format_line(path, node, link_to))
    return b"".join(out)


def _format_line(path: bytes, n: Node, link_to: bytes | None, *, hide: bool = True) -> bytes:
    ft = n.file_type
    if ft == S_IFDIR:
        assert n.entries is not None
        nlink = 2 + sum(1 for e in n.entries.values() if isinstance(e, Node) and e.is_dir)
    else:
        nlink = n.nlink
    size = len(n.payload or b"") if ft == S_IFLNK else n.size
    rdev = n.rdev if ft in (S_IFCHR, S_IFBLK) else 0
    sec = n.mtime_sec - (1 << 64) if n.mtime_sec >= 1 << 63 else n.mtime_sec
    if link_to is not None:
        payload: bytes | None = link_to
    elif ft in (S_IFREG, S_IFLNK):
        payload = n.payload
    else:
        payload = None
    content = n.content if ft == S_IFREG and n.content else None
    parts = [
        escape(path),
        b"%d" % size,
        (b"@%o" if link_to is not None else b"%o") % n.mode,
        b"%d" % nlink,
        b"%d" % n.uid,
        b"%d" % n.gid,
        b"%d" % rdev,
        b"%d.%d" % (sec, n.mtime_nsec),
        b"-" if payload is None else escape(payload, lone_dash=True),
        b"-" if content is None else escape(content, lone_dash=True),
        b"-" if n.digest is None else n.digest.hex().encode(),
    ]
    for key, value in n.xattrs.items():
        if hide and key in _HIDDEN_XATTRS:
            continue
        parts.append(escape(key, equal=True) + b"=" + escape(value, equal=True))
    return b" ".join(parts) + b"\n"
