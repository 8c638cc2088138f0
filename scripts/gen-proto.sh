#!/usr/bin/env bash
# Generate the Python gRPC stubs of proto/csi.proto into csi/server/proto/ (or into the directory
# given as $1: tests/test_server_proto.py regenerates into a temp dir and compares).
# Needs the dev extra (grpcio-tools, mypy-protobuf) in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-csi/server/proto}
py=${PYTHON:-.venv/bin/python}
plugin_dir=$(dirname "$(command -v "$py")")
mkdir -p "$out"
PATH="$plugin_dir:$PATH" "$py" -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  proto/csi.proto
# protoc writes top-level imports ("import csi_pb2"); the stubs live in a package.
sed -i -e 's/^import csi_pb2 as csi__pb2$/from . import csi_pb2 as csi__pb2/' \
  -e 's/^import csi_pb2 as _csi_pb2$/from . import csi_pb2 as _csi_pb2/' \
  "$out/csi_pb2_grpc.py" "$out/csi_pb2_grpc.pyi"
