#!/usr/bin/env bash
# Regenerate the gRPC stubs from edge_embed/v1/embed.proto (needs grpcio-tools, the test extra).
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-.venv/bin/python}" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
    edge_embed/v1/embed.proto
