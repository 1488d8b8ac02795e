#!/usr/bin/env bash
# There (GPU machine), after `source .gpu/stage.sh env`:
#   bash scripts/gpu/on_device.sh keep-a      # call 1: keep the first half
#   bash scripts/gpu/on_device.sh setup       # call 2: assemble, convert, install
#   bash scripts/gpu/on_device.sh data N T S [args] # N ShareGPT prompts, T new tokens
#   bash scripts/gpu/on_device.sh plan S [fit args...]  # --steps for S seconds
#   bash scripts/gpu/on_device.sh fit SECONDS [fit args...]   # resumable
#   bash scripts/gpu/on_device.sh eval NUM_PROMPTS MAX_NEW
#   bash scripts/gpu/on_device.sh kernels             # kernel tests + timing on CUDA
#   bash scripts/gpu/on_device.sh treebuild           # tree-build kernel tests + timing
#     (env KTEST_ARGS: more pytest args, e.g. "-k 256"; KBENCH=0: no bench)
#   bash scripts/gpu/on_device.sh engine-tests [SECS] [pytest args] # on CUDA
#     (env TESTS: test files, LOG: log name, default engine_tests)
#   bash scripts/gpu/on_device.sh round-diff [BUDGET] [ALGO]  # engine rounds
#     vs the oracle's, margins at the first difference (after engine-tests)
#   bash scripts/gpu/on_device.sh diverge [N] [MAX_NEW]  # first differing token
#     and top-2 gaps, SmolLM2 plain vs jetspec (scripts/gpu/diverge.py; env
#     DIVERGE_KINDS, DIVERGE_GRAPHS=1, DIVERGE_SEQS=1 for the bench's batch 1)
#   bash scripts/gpu/on_device.sh cuda-check          # jetspec on CUDA vs AR (SmolLM2)
#     (env CHECK_BUDGETS="16 64", BATCHES="1 4", NPROMPTS=4, BASELINE=dflash,
#      NAME: output name, BENCH_ARGS e.g. "--ar-from /tmp/jetspec/bench_smollm2/ar.json")
#   bash scripts/gpu/on_device.sh bench8b NAME chain 16 64 128  # replay, 8B shape
#     (env BATCHES="1 8", NPROMPTS=8, BENCH_SECS=540,
#      BENCH_ARGS="--stock-ar --ar-from /tmp/jetspec/NAME0/ar.json", GMU=0.85)
#   bash scripts/gpu/on_device.sh one BUDGET SEQS [BATCH]  # one 8B-shape engine
#     starts and generates (capture check; env TAG, ONE_SECS)
#   bash scripts/gpu/on_device.sh syncs ["BUDGETS"] [MAX_NEW]  # syncs per round
#     (env SYNC_MODES="eager graphs")
#   bash scripts/gpu/on_device.sh soak 16|auto|auto-online [soak args]  # the serving soak
#     (env SOAK_N=1000, SOAK_BLOCKS=512, SOAK_REPRO=same, SOAK_PASS_SECS=90;
#      auto needs `soak-cost` first, on the same machine: docs/soak.md)
#   bash scripts/gpu/on_device.sh serve-bench [SPECS...]  # vllm bench serve:
#     plain vs jetspec servers (env SB_N=200, SB_CONC=8, SB_IN=1024, SB_OUT=128,
#      SB_TEMP, SB_UTIL=0.25, SB_DTYPE=float32, SB_ARGS)
#   bash scripts/gpu/on_device.sh trace BUDGETS...  # host/device time per
#     round, SmolLM2 with graphs (0: plain decoding; scripts/gpu/trace.py)
#   bash scripts/gpu/on_device.sh sweep "DATASETS" BUDGETS...  # SmolLM2 e2e
#     sweep, every dataset (prompt file name) through the same engines
#     (env NAME: output name, SWEEP_ARGS e.g. "--ar-from /tmp/jetspec/sweep_all/ar.json"
#      with BASELINE=none to add budgets in a second call)
#     (env BATCHES="1 8 32", NPROMPTS=32, MAX_NEW=128, BASELINE=dflash)
# GRAPHS=1: the bench/sweep engines with torch.compile + CUDA graphs
# (--graphs); JETSPEC_TEST_EAGER=0: the engine tests likewise.
# Files persist under /tmp/jetspec while the machine stays warm; results go
# to $OUT (the head as two halves: one file may be at most 16 MiB).
set -euo pipefail
source scripts/gpu/device_env.sh
# At most 8 files come back from $OUT: a bench's results without replay.json.
keep() {
    mkdir -p "$OUT/$1"
    for f in bench.json partial.json bench.png engine_logs.txt; do
        [ -f "$W/$1/$f" ] && cp "$W/$1/$f" "$OUT/$1/"; done; true
}
G=(); [ "${GRAPHS:-0}" = 1 ] && G=(--graphs)
step=$1; shift
case $step in
keep-a)
    cp .gpu/jetspec/a/whl.part0 "$W/" && ls -la "$W" ;;
setup)
    name=$(cat .gpu/jetspec/b/wheel.name)
    mkdir -p "$W/cache/wheels" "$W/prompts"
    cat "$W/whl.part0" .gpu/jetspec/b/whl.part1 > "$W/cache/wheels/$name"
    echo "$(cat .gpu/jetspec/b/wheel.sha256)  $W/cache/wheels/$name" | sha256sum -c
    python3 -m pip install -q --no-index --no-deps --target /tmp/jsite .gpu/jetspec/b/wheels/*.whl
    for f in .gpu/jetspec/b/prompts/*.jsonl.gz; do
        gunzip -c "$f" > "$W/prompts/$(basename "$f" .gz)"; done
    python3 -m vllm_jetspec.tools.assets --only model --print-paths ;;
data)  # N prompts, T new tokens, SECONDS (start no new chunk after), [train data args]
    # Appends to data.jsonl: calls with other settings add to one set.
    n=$1 t=$2 secs=$3; shift 3
    python3 -m vllm_jetspec.tools.train data --prompts "$W/prompts/sharegpt.jsonl" \
        --num-prompts "$n" --max-new-tokens "$t" --max-model-len 2048 \
        --time-limit "$secs" --out "$W/data_part.jsonl" "$@" 2>&1 | tail -5
    cat "$W/data_part.jsonl" >> "$W/data.jsonl"
    wc -l "$W/data_part.jsonl" "$W/data.jsonl" ;;
plan)  # FIT_SECONDS [fit args]: time 40 steps, choose --steps for the budget
    secs=$1; shift
    rm -rf "$W/probe"
    python3 -m vllm_jetspec.tools.train fit --data "$W/data.jsonl" --out "$W/probe" \
        --stop-at 40 --log-every 10 --save-every 100000 "$@" 2>&1 | tail -3
    python3 - "$W/probe/history.jsonl" "$secs" > "$W/steps" <<'PY'
import json, sys
h = [json.loads(x) for x in open(sys.argv[1])]
a, b = h[1], h[-1]          # skip the first 10 steps (warm-up)
per = (b["seconds"] - a["seconds"]) / (b["step"] - a["step"])
print(int(float(sys.argv[2]) / per))
PY
    echo "planned steps: $(cat "$W/steps")" ;;
fit)
    secs=$1; shift
    resume=(); [ -f "$W/head/trainer.pt" ] && resume=(--resume)
    steps=(); [ -f "$W/steps" ] && steps=(--steps "$(cat "$W/steps")")
    python3 -m vllm_jetspec.tools.train fit --data "$W/data.jsonl" --out "$W/head" \
        --time-limit "$secs" "${resume[@]}" "${steps[@]}" "$@" 2>&1 | tail -25
    # Back as bf16 (the shipped form; fp32 master weights stay there).
    python3 -c "import sys, torch; from vllm_jetspec.head.io import load_head, save_head
h = load_head(sys.argv[1]); save_head(h, None, sys.argv[2], dtype=torch.bfloat16)" \
        "$W/head" "$W/head16"
    mkdir -p "$OUT/head"
    cp "$W/head16/config.json" "$W/head/history.jsonl" "$W/head/train.json" "$OUT/head/"
    split -b 15M -d -a 1 "$W/head16/model.safetensors" "$OUT/head/model.safetensors.part" ;;
eval)
    for s in gsm8k math500_subset311 humaneval mtbench; do
        python3 -m vllm_jetspec.tools.eval_tau --prompts "$W/prompts/$s.jsonl" \
            --num-prompts "$1" --max-new-tokens "$2" --head "$W/head" \
            --budgets 16 32 64 128 --algos chain accum_logp topb_prefix \
            --json "$OUT/tau_$s.json" --quiet
    done ;;
kernels)  # the Triton kernel's tests on CUDA, then its timing vs HBM copy
    # (device time from CUDA-graph replays, and eager time with the launch),
    # then a tile sweep on engine-like shapes (env KTESTS=0: no tests,
    # KBENCH=0: tests only, KTILES=0: no tile sweep, KTEST_SECS=240)
    if [ "${KTESTS:-1}" = 1 ]; then
        timeout "${KTEST_SECS:-240}" python3 -m pytest -q -p no:cacheprovider kernels \
            > "$OUT/kernel_tests.log" 2>&1 || echo "kernel tests rc $?"
        tail -5 "$OUT/kernel_tests.log"
    fi
    [ "${KBENCH:-1}" = 1 ] || exit 0
    timeout 240 python3 -m vllm_jetspec.kernels.bench_tree_attention \
        --batch 1 8 32 --prefix 512 4096 8192 --budget 16 128 256 \
        --tiles small large --splits 1 auto --repeats 20 \
        --json "$OUT/kernel_bench.json" --png "$OUT/kernel_bench.png" \
        > "$OUT/kernel_bench.log" 2>&1 \
        || echo "kernel bench rc $?"
    tail -3 "$OUT/kernel_bench.log"
    [ "${KTILES:-1}" = 1 ] || exit 0
    timeout 200 python3 -m vllm_jetspec.kernels.bench_tree_attention \
        --batch 1 8 --prefix 768 4096 --budget 16 128 --tiles small large \
        --tile 2:64:4:3 4:64:4:3 8:64:4:3 8:64:4:4 16:64:4:3 8:16:2:3 \
        4:32:2:3 --splits 1 auto --repeats 10 \
        --json "$OUT/kernel_tiles.json" > "$OUT/kernel_tiles.log" 2>&1 \
        || echo "kernel tile sweep rc $?"
    tail -2 "$OUT/kernel_tiles.log" ;;
treebuild)  # the fused tree-build, K/V move and verify-rows kernels' tests on
    # CUDA, then the tree build's device time against the torch tree core
    # (CUDA graphs; kernels/bench_tree_build.py)
    # -v: a run cut by its time limit names the tests that finished (dots
    # do not). The newest kernels first (2026-12-05: two runs cut at 280
    # and 170 s in the tree build's tests never reached them); KTEST_FILES
    # to choose, KTEST_MARK a marker expression (e.g. "not slow").
    PYTHONUNBUFFERED=1 timeout "${KTEST_SECS:-300}" python3 -m pytest -v \
        -p no:cacheprovider ${KTEST_FILES:-kernels/test_tree_verify.py \
        kernels/test_kv_move.py kernels/test_tree_build.py} ${KTEST_ARGS:-} \
        ${KTEST_MARK:+-m "$KTEST_MARK"} \
        > "$OUT/tree_build_tests.log" 2>&1 || echo "tree build tests rc $?"
    grep -cE " PASSED" "$OUT/tree_build_tests.log" | sed 's/^/passed: /'
    grep -E " (FAILED|ERROR)" "$OUT/tree_build_tests.log" | head -20
    tail -3 "$OUT/tree_build_tests.log"
    [ "${KBENCH:-1}" = 1 ] || exit 0
    timeout 150 python3 -m vllm_jetspec.kernels.bench_tree_build \
        --batch 1 8 32 --budget 16 64 128 --json "$OUT/tree_build_bench.json" \
        > "$OUT/tree_build_bench.log" 2>&1 || echo "tree build bench rc $?"
    cat "$OUT/tree_build_bench.log" | tail -40 ;;
engine-tests)  # SECS [pytest args]: engine tests on CUDA (TESTS: files)
    secs=${1:-400}; shift || true
    # Each engine writes its own log under pytest's temporary folders:
    # they come back as one archive (a failing script's own output only
    # shows its end).
    rm -rf "$W/pt"
    # Each engine in its own process (vLLM's default), whatever the caller
    # exported: in-process engines keep their memory in the test process,
    # and the fourth of a batch found 13 of 140 GiB free (2026-12-03).
    # -v: a call cut by its time limit names the tests that passed. (A
    # GREEDY batch's engines all start before its first test ends: batch
    # "a" is 4 engines + no-spec, > 310 s with graphs on 2026-12-05.)
    PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=1 timeout "$secs" \
        python3 -m pytest -v -rA --basetemp "$W/pt" \
        -p no:cacheprovider ${TESTS:-tests/test_jetspec_engine.py} "$@" \
        > "$OUT/${LOG:-engine_tests}.log" 2>&1 || echo "engine tests rc $?"
    (cd "$W/pt" && find . -name "*.log" | tar czf "$OUT/${LOG:-engine_tests}_engines.tgz" -T -) || true
    tail -40 "$OUT/${LOG:-engine_tests}.log" ;;
round-diff)  # [BUDGET] [ALGO]: where the engine's tree rounds part from the
    # oracle's and how close to a tie (scripts/gpu/round_diff.py; the tiny
    # models of the last engine-tests call, else trained anew)
    timeout "${RD_SECS:-300}" python3 scripts/gpu/round_diff.py \
        "$W/pt/shared-jetspec-tiny" "$W/round_diff" "${1:-64}" \
        "${2:-accum_logp}" > "$OUT/round_diff.log" 2>&1 || echo "round-diff rc $?"
    cp "$W/round_diff/round_diff.json" "$OUT/" 2>/dev/null || true
    grep -E '^(engine|rounds|\{)' "$OUT/round_diff.log" | cut -c1-600 ;;
diverge)  # [N] [MAX_NEW]: where plain decoding and jetspec part, SmolLM2
    # fp32 on GSM8K, with the top-2 log-prob gaps of the plain runs there
    DIVERGE_PROMPTS=${DIVERGE_PROMPTS:-$W/prompts/gsm8k.jsonl} \
        timeout "${DIVERGE_SECS:-500}" python3 scripts/gpu/diverge.py "$W/diverge" \
        "${1:-8}" "${2:-128}" > "$OUT/diverge.log" 2>&1 || echo "diverge rc $?"
    cp "$W/diverge/report.json" "$OUT/diverge_report.json" 2>/dev/null || true
    grep -E '^\{|failed' "$OUT/diverge.log" | grep -v '"first_diff": null' | cut -c1-400 || true ;;
cuda-check)  # jetspec on CUDA, SmolLM2 (DTYPE, fp32 default): tokens vs AR, tau, split
    timeout "${BENCH_SECS:-540}" python3 -m vllm_jetspec.tools.bench --dtype "${DTYPE:-float32}" \
        --prompts "$W/prompts/gsm8k.jsonl" --num-prompts "${NPROMPTS:-4}" \
        --max-new-tokens 128 --budgets ${CHECK_BUDGETS:-16 64} \
        --batch-sizes ${BATCHES:-1 4} --gpu-memory-utilization 0.5 \
        --baseline "${BASELINE:-dflash}" ${BENCH_ARGS:-} \
        "${G[@]}" --out "$W/${NAME:-bench_smollm2}" > "$OUT/${NAME:-cuda_check}.log" 2>&1 \
        || echo "cuda-check rc $?"
    keep "${NAME:-bench_smollm2}"; tail -20 "$OUT/${NAME:-cuda_check}.log" ;;
bench8b)  # NAME BASELINE BUDGETS...: replay round cost, Qwen3-8B shape
    name=$1 base=$2; shift 2
    python3 scripts/gpu/shapes.py "$W/shapes"
    # A time limit below the call's, so keep() still returns the rows so far.
    timeout "${BENCH_SECS:-540}" \
        python3 -m vllm_jetspec.tools.bench --target "$W/shapes/qwen3-8b" \
        --head "$W/shapes/head-8b" --load-format dummy --dtype bfloat16 \
        --prompt-len 512 --max-new-tokens 256 --replay \
        --batch-sizes ${BATCHES:-1 8} --num-prompts "${NPROMPTS:-8}" \
        --baseline "$base" --budgets "$@" ${BENCH_ARGS:-} "${G[@]}" \
        --max-model-len 2048 --gpu-memory-utilization "${GMU:-0.85}" \
        --out "$W/$name" > "$OUT/$name.log" 2>&1 || echo "bench8b rc $?"
    keep "$name"; tail -30 "$OUT/$name.log" ;;
one)  # BUDGET SEQS [BATCH]: start one 8B-shape jetspec engine, 64 tokens
    # (scripts/gpu/one_engine.py; env ONE_SECS, TAG: log name suffix)
    python3 scripts/gpu/shapes.py "$W/shapes" > /dev/null
    log="$OUT/one_$1_$2${TAG:-}.log"
    timeout "${ONE_SECS:-200}" python3 scripts/gpu/one_engine.py "$W/shapes" "$@" \
        > "$log" 2>&1 || echo "one rc $?"
    grep -v "^frame" "$log" | grep -E "started in|generated|Error|error:|File \"/work" \
        | head -30 ;;
syncs)  # [BUDGETS] [MAX_NEW]: synchronisations per round, eager and graphs
    # (BUDGETS: one or more, space-separated in one argument; dflash = stock)
    for b in ${1:-64}; do
    for mode in ${SYNC_MODES:-eager graphs}; do
        flag=(); [ $mode = graphs ] && flag=(--graphs)
        SYNC_PROMPTS=$W/prompts/gsm8k.jsonl timeout 240 python3 scripts/gpu/syncs.py "$W/syncs_${b}_$mode" "$b" \
            "${2:-64}" "${flag[@]}" > "$OUT/syncs_${b}_$mode.log" 2>&1 \
            || echo "syncs $b $mode rc $?"
        cp "$W/syncs_${b}_$mode/syncs.json" "$OUT/syncs_${b}_$mode.json" 2>/dev/null || true
        tail -25 "$OUT/syncs_${b}_$mode.log"
    done; done ;;
sweep)  # "DATASETS" BUDGETS...: SmolLM2 + shipped head, AR / baseline / jetspec
    files=(); for d in $1; do files+=("$W/prompts/$d.jsonl"); done
    ds=${NAME:-$(echo $1 | cut -d' ' -f1)}; shift
    timeout "${BENCH_SECS:-540}" python3 -m vllm_jetspec.tools.sweep --prompts "${files[@]}" \
        --budgets "$@" --batch-sizes ${BATCHES:-1 8 32} \
        --num-prompts "${NPROMPTS:-32}" --max-new-tokens "${MAX_NEW:-128}" \
        --baseline "${BASELINE:-dflash}" "${G[@]}" ${SWEEP_ARGS:-} --out "$W/sweep_$ds" \
        > "$OUT/sweep_$ds.log" 2>&1 || echo "sweep rc $?"
    mkdir -p "$OUT/sweep_$ds"
    # At most 8 files come back: the JSON (plots are redrawn from it).
    for f in sweep.json partial.json; do
        [ -f "$W/sweep_$ds/$f" ] && cp "$W/sweep_$ds/$f" "$OUT/sweep_$ds/"; done
    tail -40 "$OUT/sweep_$ds.log" ;;
trace)  # BUDGETS...: host (cProfile) and device (torch.profiler) time of
    # SmolLM2 rounds with graphs, batch 1; 0 = plain decoding, dflash =
    # vLLM's linear drafter with the shipped head; device busy / idle per
    # step and the host frames of the idle time (scripts/gpu/trace.py)
    for b in "$@"; do
        TRACE_PROMPTS=${TRACE_PROMPTS:-$W/prompts/gsm8k.jsonl} \
            timeout "${TRACE_SECS:-200}" python3 scripts/gpu/trace.py "$W/trace_$b" "$b" \
            "${NPROMPTS:-2}" "${MAX_NEW:-64}" > "$OUT/trace_$b.log" 2>&1 \
            || echo "trace $b rc $?"
        cp "$W/trace_$b/tables.txt" "$OUT/trace_$b.txt" 2>/dev/null || true
        grep '^{' "$OUT/trace_$b.log" | tail -1
    done ;;
trace8b)  # BUDGETS...: Qwen3-8B shape replay, batch 1: device idle by host
    # Python frame, device time by kernel (0 first: plain decoding, writes the replay)
    python3 scripts/gpu/shapes.py "$W/shapes" > /dev/null
    for b in "$@"; do
        timeout "${TRACE_SECS:-240}" python3 scripts/gpu/trace8b.py "$W/shapes" "$W/trace8b" \
            "$b" "${MAX_NEW:-64}" > "$OUT/trace8b_$b.log" 2>&1 || echo "trace8b $b rc $?"
        cp "$W/trace8b/trace8b_$b.txt" "$W/trace8b/trace8b_$b.json.gz" "$OUT/" 2>/dev/null || true
        grep '^{' "$OUT/trace8b_$b.log" | tail -1 || true
    done ;;
soak)  # BUDGET (16 | auto | auto-online) [soak args]: python -m
    # vllm_jetspec.tools.soak, SmolLM2 fp32 + the shipped head, 1000 mixed
    # requests at concurrency 32; auto reads the cost model soak-cost wrote
    # (docs/soak.md), auto-online is tree_budget "auto" without one
    b=$1; shift
    cm=(); [ "$b" = auto ] && cm=(--cost-model "$W/soak_cost/cost_model.json")
    timeout "${SOAK_SECS:-570}" python3 -m vllm_jetspec.tools.soak --budget "${b%-online}" "${cm[@]}" \
        --prompts "$W"/prompts/{gsm8k,sharegpt,mtbench,humaneval}.jsonl \
        --num-requests "${SOAK_N:-1000}" --concurrency 32 --max-num-seqs 32 \
        --max-tokens 256 --num-gpu-blocks "${SOAK_BLOCKS:-512}" \
        --repro "${SOAK_REPRO:-same}" --time-limit "${SOAK_PASS_SECS:-90}" \
        --startup-timeout 240 "$@" --out "$W/soak_$b" > "$OUT/soak_$b.log" 2>&1 \
        || echo "soak rc $?"
    mkdir -p "$OUT/soak_$b"
    for f in soak.json partial.json; do
        [ -f "$W/soak_$b/$f" ] && cp "$W/soak_$b/$f" "$OUT/soak_$b/"; done
    [ -f "$W/soak_$b/requests.jsonl" ] && gzip -c "$W/soak_$b/requests.jsonl" \
        > "$OUT/soak_$b/requests.jsonl.gz"
    # auto's periodic "what it chose" lines (also in soak.json, when the
    # soak got to its report)
    grep -h "jetspec auto:" "$W/soak_$b/server_spec.log" \
        > "$OUT/soak_$b/auto_choices.txt" 2>/dev/null || true
    tail -3 "$OUT/soak_$b.log" ;;
soak-cost)  # cost_model.json for `soak auto`: AR and budgets (COST_BUDGETS)
    # at batch 1/8/32, SmolLM2 fp32 with graphs, as the soak's servers run
    timeout "${BENCH_SECS:-560}" python3 -m vllm_jetspec.tools.bench \
        --prompts "$W/prompts/gsm8k.jsonl" --budgets ${COST_BUDGETS:-8 16 32} \
        --batch-sizes 1 8 32 --num-prompts 32 --max-new-tokens 64 --baseline none \
        --graphs --max-model-len 1024 --resume --out "$W/soak_cost" ${COST_ARGS:-} \
        > "$OUT/soak_cost.log" 2>&1 || echo "bench rc $?"
    cp "$W/soak_cost/cost_model.json" "$W/soak_cost/bench.json" "$OUT/" 2>/dev/null || true
    tail -5 "$OUT/soak_cost.log" ;;
serve-bench)  # [SPECS...]: python -m vllm_jetspec.tools.serve_bench, a plain
    # SmolLM2 server and a jetspec one per spec (default 16 auto-online; the
    # shipped head), each measured by vLLM's `vllm bench serve` (random
    # dataset, SB_N prompts, concurrency SB_CONC, SB_IN/SB_OUT tokens,
    # sampling at the server's defaults unless SB_TEMP): issue 24's serving
    # target. All servers start at once (SB_UTIL of the GPU each).
    specs=(); for s in ${@:-16 auto-online}; do specs+=(--spec "$s"); done
    t=(); [ -n "${SB_TEMP:-}" ] && t=(--temperature "$SB_TEMP")
    timeout "${SB_SECS:-570}" python3 -m vllm_jetspec.tools.serve_bench \
        "${specs[@]}" "${t[@]}" --dtype "${SB_DTYPE:-float32}" \
        --num-prompts "${SB_N:-200}" --concurrency "${SB_CONC:-8}" \
        --input-len "${SB_IN:-1024}" --output-len "${SB_OUT:-128}" \
        --gpu-util-each "${SB_UTIL:-0.25}" --startup-timeout 300 \
        ${SB_ARGS:-} --out "$W/serve_bench" > "$OUT/serve_bench.log" 2>&1 \
        || echo "serve_bench rc $?"
    mkdir -p "$OUT/serve_bench"
    cp "$W"/serve_bench/*.json "$OUT/serve_bench/" 2>/dev/null || true
    tail -8 "$OUT/serve_bench.log" ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
