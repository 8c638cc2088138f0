"""The CSI protocol file and its generated stubs."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from csi.server.proto import csi_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py", "csi_pb2_grpc.pyi")
REFERENCE = ROOT.parent / "shared" / "docs" / "csi-reference.md"


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
        if (ROOT / ".venv" / "bin" / "python").exists()
        else dict(os.environ),
    )
    for name in GENERATED:
        fresh = (tmp_path / name).read_bytes()
        committed = (ROOT / "csi" / "server" / "proto" / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run scripts/gen-proto.sh"


def test_services_and_methods() -> None:
    services = {
        s.full_name: [m.name for m in s.methods] for s in pb.DESCRIPTOR.services_by_name.values()
    }
    assert services["csi.v1.Identity"] == ["GetPluginInfo", "GetPluginCapabilities", "Probe"]
    assert "NodePublishVolume" in services["csi.v1.Node"]
    assert "CreateVolume" in services["csi.v1.Controller"]


_TYPES = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_INT32: "int32",
}


def _reference_tables() -> dict[str, list[tuple[int, str, str]]]:
    text = REFERENCE.read_text()
    section = text[text.index("## 5. CSI spec") : text.index("### 5d.")]
    tables: dict[str, list[tuple[int, str, str]]] = {}
    for m in re.finditer(r"\*\*([A-Za-z.]+)\*\*[^\n]*\n\n((?:\|[^\n]*\n)+)", section):
        rows = []
        for line in m.group(2).splitlines()[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append((int(cells[0]), cells[1], cells[2]))
        tables[m.group(1)] = rows
    return tables


def _field_type(f: FieldDescriptor) -> str:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        return "map<string,string>"
    if f.message_type is not None:
        name = f.message_type.full_name
        base = name.removeprefix("csi.v1.")
        out = "." + name if name.startswith("google.") else base.rsplit(".", 1)[-1]
    elif f.enum_type is not None:
        out = f.enum_type.name
    else:
        out = _TYPES[f.type]
    return ("repeated " + out) if f.is_repeated else out


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared/docs/csi-reference.md not present")
def test_fields_match_the_spec_tables() -> None:
    """Every message of csi-reference.md §5: same field numbers, names and types."""
    tables = _reference_tables()
    assert len(tables) > 40
    for name, rows in tables.items():
        desc = pb.DESCRIPTOR.message_types_by_name[name.split(".")[0]]
        for part in name.split(".")[1:]:
            desc = desc.nested_types_by_name[part]
        ours = {f.number: (f.name, _field_type(f)) for f in desc.fields}
        for number, field, typ in rows:
            assert number in ours, f"{name}: field {number} ({field}) missing"
            got_name, got_type = ours[number]
            assert got_name == field, f"{name}.{number}: {got_name} != {field}"
            want = typ.replace("google.protobuf.", ".google.protobuf.").replace("..", ".")
            assert got_type.endswith(want.rsplit(".", 1)[-1]) or got_type == want, (
                f"{name}.{field}: {got_type} != {typ}"
            )
        assert len(ours) == len(rows), f"{name}: {sorted(ours)} vs {[r[0] for r in rows]}"
