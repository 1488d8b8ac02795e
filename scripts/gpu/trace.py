"""Where does a round's wall time go? SmolLM2 + the shipped head, one
engine (jetspec at BUDGET, or plain decoding with budget 0) with
torch.compile + CUDA graphs, batch 1, in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, so the runner runs here).

A first generate (untimed) compiles and captures every shape; the same
prompts are generated again three times: plain (timed), under cProfile
(host time by Python function) and under torch.profiler (device time by
kernel, and host time by op). Writes OUT/trace.json (timings) and the
tables to OUT/tables.txt.

    python scripts/gpu/trace.py OUT [BUDGET] [NUM_PROMPTS] [MAX_NEW]
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time


def main() -> None:
    out = sys.argv[1]
    budget = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    max_new = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    os.makedirs(out, exist_ok=True)
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_jetspec.tools import assets
    from vllm_jetspec.tools.eval_tau import encode_prompts
    from vllm_jetspec.heads import shipped_head_dir

    target = str(assets.default_model_dir())
    src = os.environ.get("TRACE_PROMPTS", "gsm8k")
    prompts = encode_prompts(assets.load_prompts(src, limit=n),
                             AutoTokenizer.from_pretrained(target), chat=True)
    spec = None
    if budget:
        spec = {"method": "jetspec", "model": str(shipped_head_dir()),
                "tree_budget": budget}
    llm = LLM(target, speculative_config=spec, dtype="float32",
              enforce_eager=False, gpu_memory_utilization=0.4,
              max_model_len=2048, max_num_seqs=4, disable_log_stats=False)
    sp = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True)
    tp = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def gen():
        for p in tp:          # batch 1
            llm.generate([p], sp, use_tqdm=False)

    def drafts():
        return sum(x.value for x in llm.get_metrics()
                   if x.name == "vllm:spec_decode_num_drafts")

    gen()                     # compiles, captures, JIT
    d0 = drafts()
    t = time.perf_counter()
    gen()
    wall = time.perf_counter() - t
    rounds = drafts() - d0
    steps = rounds if budget else n * max_new
    res = dict(budget=budget, prompts=n, max_new=max_new, wall_s=wall,
               rounds=rounds, ms_per_step=1e3 * wall / max(steps, 1),
               tokens=n * max_new, tok_s=n * max_new / wall,
               device=torch.cuda.get_device_name(0))
    print(json.dumps(res))

    prof = cProfile.Profile()
    prof.enable()
    gen()
    prof.disable()
    tables = open(os.path.join(out, "tables.txt"), "w")
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(70)
        tables.write(f"===== cProfile by {key}\n{s.getvalue()}\n")

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU,
                             ProfilerActivity.CUDA]) as p:
        gen()
    ka = p.key_averages()
    tables.write("===== torch ops by host time\n")
    tables.write(ka.table(sort_by="self_cpu_time_total", row_limit=60))
    tables.write("\n\n===== torch ops by device time\n")
    tables.write(ka.table(sort_by="self_device_time_total", row_limit=40))
    tables.close()
    dev_us = sum(e.self_device_time_total for e in ka)
    launches = sum(e.count for e in ka if e.self_device_time_total > 0)
    res.update(device_busy_ms_per_step=dev_us / 1e3 / max(steps, 1),
               device_ops_per_step=launches / max(steps, 1))
    print(json.dumps(res))
    with open(os.path.join(out, "trace.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
