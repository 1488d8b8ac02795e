"""Count the host-device synchronisations of jetspec rounds on CUDA, and
say where they are.

SmolLM2 (fp32) + the shipped head, jetspec at one budget, in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``); after a warm-up, PyTorch's sync
debug mode (``torch.cuda.set_sync_debug_mode("warn")``) turns every
synchronising CUDA call into a warning attributed to the Python line that
made it; they are counted per line over a generation and divided by the
number of engine steps. Writes ``syncs.json`` to OUT_DIR. BUDGET
``dflash`` counts stock vLLM's linear DFlash drafter with the same head
(depth from its config) for comparison: on the V2 runner vLLM's own
round has synchronisations too, and only those beyond it are jetspec's.

    python scripts/gpu/syncs.py OUT_DIR [BUDGET|dflash] [MAX_NEW] [--graphs]
"""

from __future__ import annotations

import collections
import json
import os
import sys
import warnings

# The engine in this process, whatever the caller exported: with vLLM's
# default (its own process) the profilers here see no step at all (H100,
# 2026-12-05: a trace of 0.0 ms device time a step).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    graphs = "--graphs" in sys.argv
    out = args[0]
    budget = args[1] if len(args) > 1 else "64"
    max_new = int(args[2]) if len(args) > 2 else 64
    os.makedirs(out, exist_ok=True)

    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_jetspec.tools import assets
    from vllm_jetspec.tools.eval_tau import encode_prompts
    from vllm_jetspec.heads import shipped_head_dir

    target = str(assets.default_model_dir())
    head = str(shipped_head_dir())
    if budget == "dflash":
        from vllm_jetspec.head.config import HeadConfig
        depth = HeadConfig.from_json(os.path.join(head, "config.json")).block_size - 1
        spec = {"method": "dflash", "model": head,
                "num_speculative_tokens": depth}
    else:
        spec = {"method": "jetspec", "model": head,
                "tree_budget": int(budget)}
    prompts = encode_prompts(assets.load_prompts(
        os.environ.get("SYNC_PROMPTS", "gsm8k"), limit=1),
                             AutoTokenizer.from_pretrained(target), chat=True)
    llm = LLM(target, dtype="float32", enforce_eager=not graphs,
              gpu_memory_utilization=0.4, max_model_len=2048,
              max_num_seqs=4, max_num_batched_tokens=2048,
              disable_log_stats=False,
              speculative_config=spec)
    sp = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True)
    tp = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(tp, SamplingParams(max_tokens=16, ignore_eos=True),
                 use_tqdm=False)

    def drafts():
        return sum(x.value for x in llm.get_metrics()
                   if x.name == "vllm:spec_decode_num_drafts")

    d0 = drafts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            llm.generate(tp, sp, use_tqdm=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    rounds = drafts() - d0
    where = collections.Counter(
        f"{os.path.relpath(w.filename) if 'jetspec' in w.filename else w.filename}:{w.lineno}"
        for w in caught if "synchroniz" in str(w.message))
    total = sum(where.values())
    res = dict(budget=budget, max_new_tokens=max_new, graphs=graphs,
               rounds=rounds, total_syncs=total,
               syncs_per_round=total / max(rounds, 1),
               by_line={k: v for k, v in where.most_common()},
               device=torch.cuda.get_device_name(0))
    with open(os.path.join(out, "syncs.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"{rounds} rounds, {total} synchronisations "
          f"({res['syncs_per_round']:.2f} per round)")
    for k, v in where.most_common():
        print(f"{v:6d}  {v / max(rounds, 1):6.2f}/round  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
