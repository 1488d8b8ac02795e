#!/usr/bin/env bash
# Full test suite: sets up the environment on a fresh machine (CUDA vLLM in
# .venv-cuda/ where nvidia-smi works, vLLM's CPU build in .venv/ elsewhere;
# scripts/setup_env.sh), then runs pytest with any arguments passed through
# (e.g. scripts/test.sh -k tree -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/setup_env.sh"
if [ "$JETSPEC_ENV" = cpu ]; then
    source "$ROOT/scripts/cpu_env.sh"
else
    export TOKENIZERS_PARALLELISM=false
fi
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected": a suite that runs nothing is a failure.
    echo "[test] no tests were collected" >&2
    exit 1
fi
exit "$rc"
