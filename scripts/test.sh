#!/usr/bin/env bash
# Full test suite: sets up the environment on a fresh machine (CUDA vLLM in
# .venv-cuda/ where nvidia-smi works, vLLM's CPU build in .venv/ elsewhere;
# scripts/setup_env.sh), then runs pytest with any arguments passed through
# (e.g. scripts/test.sh -k tree -x; scripts/test.sh --quick is the quick
# loop, see conftest.py).
#
# Two pytest runs: the tests marked `exclusive` (they need every core, e.g.
# TP=2) alone, then all the others on one pytest-xdist worker per core
# (JETSPEC_TEST_WORKERS to change; 1: no workers). Ends with the slowest tests
# over both runs, the wall time of set-up and of the tests, and one total
# line. JETSPEC_TEST_DURATIONS=1 also writes the measured seconds to
# tests/durations.json (the scheduling order of later runs; commit it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
t0=$(date +%s)
source "$ROOT/scripts/setup_env.sh"
if [ "$JETSPEC_ENV" = cpu ]; then
    source "$ROOT/scripts/cpu_env.sh"
else
    export TOKENIZERS_PARALLELISM=false
fi
t1=$(date +%s)

workers="${JETSPEC_TEST_WORKERS:-$(nproc)}"
xdist=(-n "$workers")
[ "$workers" -le 1 ] && xdist=(-n 0)
stop_on_fail=0
quick=0
for a in "$@"; do
    case "$a" in
        -x|--exitfirst|--maxfail*) stop_on_fail=1 ;;
        --quick) quick=1 ;;    # it leaves the exclusive tests out
    esac
done

REPORT="$ROOT/.cache/test-report"
rm -rf "$REPORT"
mkdir -p "$REPORT"
phase() {  # phase NAME PYTEST-ARGS...: its exit status in rc_NAME
    local name="$1"; shift
    set +e
    JETSPEC_TEST_REPORT="$REPORT/$name.json" \
        "$VENV/bin/python" -m pytest --phase "$name" "$@"
    printf -v "rc_$name" '%s' "$?"
    set -e
}
rc_exclusive=5
[ "$quick" -eq 1 ] || phase exclusive -n 0 "$@"
t2=$(date +%s)
rc_parallel=5
if [ "$rc_exclusive" -eq 0 ] || [ "$rc_exclusive" -eq 5 ] \
        || [ "$stop_on_fail" -eq 0 ]; then
    phase parallel "${xdist[@]}" "$@"
fi
t3=$(date +%s)

"$VENV/bin/python" "$ROOT/scripts/test_report.py" "$REPORT" \
    --setup-s $((t1 - t0)) --exclusive-s $((t2 - t1)) \
    --parallel-s $((t3 - t2)) --workers "$workers" \
    ${JETSPEC_TEST_DURATIONS:+--write-durations "$ROOT/tests/durations.json"}

# pytest's 5 is "no tests collected": fine for one run, not for both (a
# suite that runs nothing is a failure).
if [ "$rc_exclusive" -eq 5 ] && [ "$rc_parallel" -eq 5 ]; then
    echo "[test] no tests were collected" >&2
    exit 1
fi
for rc in "$rc_exclusive" "$rc_parallel"; do
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
        exit "$rc"
    fi
done
exit 0
