#!/usr/bin/env bash
# Make .venv with backprop-ninja and its test tools installed. Idempotent and quick when done:
# it does nothing if pyproject.toml has not changed since the last successful run.
# TORCH_SPEC picks the torch to install first (default: the 2.13.0 CPU build; on machines with a
# local wheel pip takes it in seconds, and an unpinned torch could pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.bootstrap-stamp
want="$(cat pyproject.toml) $TORCH_SPEC"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -W ignore -c "import torch" || { echo "bootstrap: torch failed to install ($TORCH_SPEC)" >&2; exit 1; }
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import backprop_ninja, pytest, hypothesis" || { echo "bootstrap: install failed" >&2; exit 1; }
printf '%s' "$want" > "$stamp"
