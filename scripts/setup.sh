#!/usr/bin/env bash
# Create .venv with everything llmtrain needs (idempotent). `--dev` adds the test extras.
# torch is installed first and pinned, so pip never replaces it with a multi-GB CUDA build on a
# CPU machine; on a GPU cluster set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") to your CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".${extras}"
.venv/bin/python -c "import torch, deepspeed; print(f'llmtrain env ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')" 2>/dev/null | tail -1
