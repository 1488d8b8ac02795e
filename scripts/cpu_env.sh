#!/usr/bin/env bash
# Environment for running vLLM's CPU backend here (sourced).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# vLLM CPU asks for Intel's OpenMP runtime preloaded (it ships in the
# intel-openmp wheel); without it speculative decoding warns and is slower.
IOMP="$ROOT/.venv/lib/libiomp5.so"
if [ -f "$IOMP" ] && [[ ":${LD_PRELOAD:-}:" != *":$IOMP:"* ]]; then
    export LD_PRELOAD="${IOMP}${LD_PRELOAD:+:$LD_PRELOAD}"
fi
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
