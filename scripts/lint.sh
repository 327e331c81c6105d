#!/usr/bin/env bash
# Lint, format check and type check, as CI runs them (.ci/run). Needs the dev extras (scripts/setup.sh --dev).
# `ruff format .` and `ruff check --fix .` repair most findings.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
