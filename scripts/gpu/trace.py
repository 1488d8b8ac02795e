"""Where does a round's wall time go? SmolLM2 + the shipped head, one
engine with torch.compile + CUDA graphs, batch 1, in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, so the runner runs here): jetspec at
BUDGET, plain decoding (0), or ``dflash`` (vLLM's linear drafter with the
same head, depth drafts a round: the round jetspec is compared with).

A first generate (untimed) compiles and captures every shape; the same
prompts are generated again: timed, under cProfile (host time by Python
function), and one prompt under torch.profiler with Python stacks: device
time by kernel, the device's busy and idle time per step, and the Python
frames the host was in while the device idled (``trace8b.py``'s analysis,
here for the small target, whose rounds the host may bound). Writes
OUT/trace.json (numbers) and OUT/tables.txt. Engine settings come from the
environment as usual (e.g. ``JETSPEC_TREE_PRECISION=tf32``,
``JETSPEC_VERIFY_ROWS=torch``); the engines' ``max_num_seqs`` is 8, as in
``cuda-check`` with ``BATCHES="1 8"`` (an AR step's cost depends on it).
Runs on CPU too (no device rows), for a smoke check.

    python scripts/gpu/trace.py OUT [BUDGET|dflash] [NUM_PROMPTS] [MAX_NEW]
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace8b import (idle_attribution, kernel_table,  # noqa: E402
                     write_tables)

# (trace8b sets it too.) The engine in this process, whatever the caller exported: with vLLM's
# default (its own process) the profilers here see no step at all (H100,
# 2026-12-05: a trace of 0.0 ms device time a step).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def engine_spec(which: str, head: str) -> dict | None:
    """The speculative config of ``which``: 0 plain, ``dflash``, or a
    jetspec tree budget."""
    if which == "dflash":
        with open(os.path.join(head, "config.json")) as f:
            depth = json.load(f)["block_size"] - 1
        return {"method": "dflash", "model": head,
                "num_speculative_tokens": depth}
    budget = int(which)
    if budget < 0:
        raise ValueError(f"budget {budget}: 0 (plain) or more")
    return {"method": "jetspec", "model": head,
            "tree_budget": budget} if budget else None


def main() -> None:
    out = sys.argv[1]
    which = sys.argv[2] if len(sys.argv) > 2 else "16"
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    max_new = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    os.makedirs(out, exist_ok=True)
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_jetspec.heads import shipped_head_dir
    from vllm_jetspec.tools import assets
    from vllm_jetspec.tools.eval_tau import encode_prompts

    target = str(assets.default_model_dir())
    src = os.environ.get("TRACE_PROMPTS", "gsm8k")
    prompts = encode_prompts(assets.load_prompts(src, limit=n),
                             AutoTokenizer.from_pretrained(target), chat=True)
    spec = engine_spec(which, str(shipped_head_dir()))
    cuda = torch.cuda.is_available()
    llm = LLM(target, speculative_config=spec, dtype="float32",
              enforce_eager=not cuda, gpu_memory_utilization=0.4,
              max_model_len=2048, max_num_seqs=8, disable_log_stats=False)
    sp = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True)
    tp = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def gen(ps=tp):
        for p in ps:          # batch 1
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
    steps = rounds if spec else n * max_new
    res = dict(engine=which, prompts=n, max_new=max_new, wall_s=wall,
               rounds=rounds, ms_per_step=1e3 * wall / max(steps, 1),
               tokens=n * max_new, tok_s=n * max_new / wall,
               tau=n * max_new / rounds if rounds else None,
               env={k: v for k, v in os.environ.items()
                    if k.startswith("JETSPEC_")},
               device=torch.cuda.get_device_name(0) if cuda else "cpu",
               date=time.strftime("%Y-%m-%d"))
    print(json.dumps(res), flush=True)

    prof = cProfile.Profile()
    prof.enable()
    gen()
    prof.disable()
    tables = open(os.path.join(out, "tables.txt"), "w")
    tables.write(json.dumps(res) + "\n\n")
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(70)
        tables.write(f"===== cProfile by {key}\n{s.getvalue()}\n")

    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, with_stack=True) as p:
        d0 = drafts()
        gen(tp[:1])
        profiled = drafts() - d0
    raw = os.path.join(out, "trace_chrome.json")
    p.export_chrome_trace(raw)
    with open(raw) as f:
        events = json.load(f)["traceEvents"]
    os.remove(raw)
    idle = idle_attribution(events)
    if cuda and not idle["busy_us"]:
        raise SystemExit("trace: the profiler saw no kernel on the device "
                         "(did the engine run in another process?)")
    psteps = (profiled if spec else max_new) or 1
    res.update(profiled_steps=psteps,
               busy_ms_per_step=idle["busy_us"] / 1e3 / psteps,
               window_ms_per_step=idle["window_us"] / 1e3 / psteps,
               idle_ms_per_step=idle["idle_us"] / 1e3 / psteps,
               gaps_per_step=idle["gaps"] / psteps)
    write_tables(tables, idle, kernel_table(events), "one profiled prompt")
    tables.close()
    print(json.dumps(res), flush=True)
    with open(os.path.join(out, "trace.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
