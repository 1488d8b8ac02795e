#!/usr/bin/env bash
# Issue 23, parts 2 and 5, on the GPU machine, after the staging of
# scripts/gpu/README.md (vLLM bundle + `on_device.sh setup`) and
# `source .gpu/stage.sh env && export VLLM_ENABLE_V1_MULTIPROCESSING=0`:
#   bash scripts/gpu/users_check.sh serve-defaults  # bare `vllm serve` + openai
#   bash scripts/gpu/users_check.sh demo            # python -m vllm_jetspec.tools.demo
# serve-defaults: SmolLM2 + the shipped head (block 16: 14 draft-pass slots
# per sequence) at tree_budget 16 with no batch flags, i.e. vLLM's serving
# defaults (1024 sequences, 8192 tokens on a >= 70 GiB GPU), which gave
# "max_num_scheduled_tokens is set to -6144" before (H200, 2026-12-02).
# Expect the start-up line "jetspec: max_num_seqs 1024 (vLLM's default)
# lowered to 273" and answers from the openai client. Logs go to $OUT.
set -euo pipefail
source scripts/gpu/device_env.sh
OUT=${OUT:-$W/out}
mkdir -p "$OUT"
MODEL=$(python3 -m vllm_jetspec.tools.assets --only model --print-paths | awk -F'\t' '{print $2}' | tail -1)
HEAD=$PWD/vllm_jetspec/heads/smollm2-135m-instruct
case ${1:-} in
serve-defaults)
    PORT=${PORT:-8123}
    SPEC="{\"method\": \"jetspec\", \"model\": \"$HEAD\", \"tree_budget\": ${BUDGET:-16}}"
    if command -v vllm >/dev/null 2>&1; then
        CMD=(vllm serve "$MODEL")
    else
        CMD=(python3 -m vllm.entrypoints.openai.api_server --model "$MODEL")
    fi
    echo "+ ${CMD[*]} --port $PORT --speculative-config '$SPEC'" | tee "$OUT/serve_defaults.log"
    VLLM_LOG_STATS_INTERVAL=1 "${CMD[@]}" --port "$PORT" \
        --speculative-config "$SPEC" >> "$OUT/serve_defaults.log" 2>&1 &
    pid=$!
    ok=0
    for _ in $(seq 1 "${SERVE_WAIT:-420}"); do
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; then
            ok=1; break
        fi
        sleep 1
    done
    if [ "$ok" = 1 ]; then
        python3 scripts/gpu/serve_client.py "$PORT" "$MODEL" 2>&1 | tee "$OUT/serve_client.log" || true
        sleep 2
    else
        echo "server did not come up" | tee "$OUT/serve_client.log"
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    grep -E "jetspec|max_num_scheduled_tokens|Mean acceptance length|Error" \
        "$OUT/serve_defaults.log" | grep -v DEBUG | tail -30 ;;
demo)
    python3 -m vllm_jetspec.tools.demo --prompts "$W/prompts/gsm8k.jsonl" \
        --num-prompts "${NPROMPTS:-2}" --max-new-tokens "${MAX_NEW:-64}" \
        > "$OUT/demo.log" 2>&1 || echo "demo rc $?" | tee -a "$OUT/demo.log"
    grep -v DEBUG "$OUT/demo.log" | tail -25 ;;
*)
    echo "usage: $0 serve-defaults|demo" >&2; exit 2 ;;
esac
