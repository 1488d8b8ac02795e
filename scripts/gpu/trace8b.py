"""Where does a round's wall time go on the Qwen3-8B shape? One engine
(dummy weights, bf16, torch.compile + CUDA graphs, batch 1, this process:
VLLM_ENABLE_V1_MULTIPROCESSING=0), plain decoding (BUDGET 0: also
records the replay file), jetspec at BUDGET replaying it (tau = depth + 1,
as ``python -m vllm_jetspec.tools.bench --replay``), ``chain`` (jetspec's
chain of the head's depth, replaying) or ``dflash`` (vLLM's linear drafter
with the same head: accepts nothing on dummy weights, so a round is one
draft + one verify of depth + 1 tokens). Besides the wall time per round,
``decode_ms_per_round`` leaves the prefill out (the time of a 1-token
generate of each prompt is subtracted: a tau-16 engine has one prefill in
every few rounds, AR one in hundreds).

After an untimed warm-up generate (compiles, captures) the prompts are
generated once timed, then one prompt under ``torch.profiler`` with Python
stacks. From that trace (also written, gzipped): device-busy time, the
idle gaps of the device, and which Python functions the host was in while
the device idled (inclusive: a gap counts for every frame on the stack;
exclusive: the innermost frame), plus device time by kernel.

    python scripts/gpu/trace8b.py SHAPES_DIR OUT BUDGET|chain|dflash [MAX_NEW]

Writes OUT/trace8b_BUDGET.json (numbers), OUT/trace8b_BUDGET.txt (tables),
OUT/trace8b_BUDGET.json.gz (the Chrome trace); the replay file is
OUT/replay8b.json. TRACE8B_PROFILE=0: the timed rows only, no profile.
"""

from __future__ import annotations

import collections
import gzip
import heapq
import json
import os
import shutil
import sys
import time

# The engine in this process, whatever the caller exported: with vLLM's
# default (its own process) the profilers here see no step at all (H100,
# 2026-12-05: a trace of 0.0 ms device time a step).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def idle_attribution(events: list[dict], min_gap_us: float = 5.0) -> dict:
    """Device idle gaps of a Chrome trace and the host Python frames
    active at each gap's midpoint (on the thread with most frames)."""
    dev = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                 if e.get("ph") == "X" and e.get("cat") in (
                     "kernel", "gpu_memcpy", "gpu_memset"))
    if not dev:
        return dict(busy_us=0.0, window_us=0.0, gaps=0, idle_us=0.0,
                    inclusive=[], exclusive=[])
    merged = [list(dev[0])]
    for s, e in dev[1:]:
        if s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    busy = sum(e - s for s, e in merged)
    gaps = [(merged[i][1], merged[i + 1][0]) for i in range(len(merged) - 1)
            if merged[i + 1][0] - merged[i][1] >= min_gap_us]
    py = [e for e in events if e.get("ph") == "X"
          and e.get("cat") == "python_function"]
    tids = collections.Counter(e["tid"] for e in py)
    main_tid = tids.most_common(1)[0][0] if tids else None
    py = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"])
                for e in py if e["tid"] == main_tid)
    incl, excl = collections.Counter(), collections.Counter()
    active: list = []           # heap of (end, -start, name)
    j = 0
    for s, e in sorted(gaps, key=lambda g: (g[0] + g[1]) / 2):
        m = (s + e) / 2
        while j < len(py) and py[j][0] <= m:
            heapq.heappush(active, (py[j][1], -py[j][0], py[j][2]))
            j += 1
        while active and active[0][0] < m:
            heapq.heappop(active)
        frames = [a for a in active if a[0] >= m]
        for name in {a[2] for a in frames}:
            incl[name] += e - s
        if frames:
            excl[max(frames, key=lambda a: -a[1])[2]] += e - s
        else:
            excl["(no python frame)"] += e - s
    return dict(busy_us=busy, window_us=merged[-1][1] - merged[0][0],
                gaps=len(gaps), idle_us=sum(e - s for s, e in gaps),
                inclusive=incl.most_common(60),
                exclusive=excl.most_common(30))


def write_tables(f, idle: dict, kern: list[tuple], what: str) -> None:
    """The idle attribution (inclusive, exclusive) and the kernel table as
    text (``what``: the profiled span)."""
    f.write(f"===== device idle (us, {what}) by Python frame, inclusive\n")
    for name, us in idle["inclusive"]:
        f.write(f"{us:12.0f}  {name}\n")
    f.write("\n===== ... exclusive (innermost frame)\n")
    for name, us in idle["exclusive"]:
        f.write(f"{us:12.0f}  {name}\n")
    f.write("\n===== device time by kernel (us, count)\n")
    for name, c, us in kern:
        f.write(f"{us:12.1f} {c:6d}  {name}\n")


def kernel_table(events: list[dict], n: int = 40) -> list[tuple]:
    tot, cnt = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            tot[e["name"]] += e.get("dur", 0)
            cnt[e["name"]] += 1
    return [(k[:110], cnt[k], round(v, 1)) for k, v in tot.most_common(n)]


def main() -> None:
    shapes, out, which = sys.argv[1], sys.argv[2], sys.argv[3]
    max_new = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    os.makedirs(out, exist_ok=True)
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_jetspec.tools.bench import synthetic_prompts
    from vllm_jetspec.tools.engine_job import batched_tokens, graph_sizes
    from vllm_jetspec.replay import save_replay

    prompts = synthetic_prompts(2, 512, 151936)
    replay = os.path.join(out, "replay8b.json")
    head = os.path.join(shapes, "head-8b")
    with open(os.path.join(head, "config.json")) as f:
        depth = json.load(f)["block_size"] - 1
    spec = None
    if which == "dflash":
        budget = depth + 1
        spec = {"method": "dflash", "model": head,
                "num_speculative_tokens": depth}
    elif which == "chain":
        budget = depth + 1
        spec = {"method": "jetspec", "tree_budget": budget,
                "tree_algo": "chain", "model": head, "replay": replay}
    else:
        budget = int(which)
    if which not in ("dflash", "chain") and budget:
        spec = {"method": "jetspec", "tree_budget": budget,
                "model": head, "replay": replay}
    kw = {}
    if budget:
        # The verify step's size and the draft pass's (1 + depth tokens a
        # request, the V2 runner's DFlash graph): with the verify size only,
        # a budget other than 1 + depth left the draft pass without its
        # FULL graph (budget 128, 2026-12-03: `_run_model` piecewise in the
        # trace), as `bench` already knew (its `graph_sizes(depth + 1)`).
        kw = dict(max_num_batched_tokens=batched_tokens(budget, 1, depth),
                  compilation_config=dict(cudagraph_capture_sizes=sorted(
                      set(graph_sizes(budget, 1))
                      | set(graph_sizes(depth + 1, 1)))))
    llm = LLM(os.path.join(shapes, "qwen3-8b"), load_format="dummy",
              dtype="bfloat16", max_model_len=2048, max_num_seqs=1,
              skip_tokenizer_init=True, gpu_memory_utilization=0.85,
              disable_log_stats=False, speculative_config=spec, **kw)
    sp = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True,
                        detokenize=False)
    tp = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def gen(which):
        return [llm.generate([p], sp, use_tqdm=False)[0] for p in which]

    def drafts():
        return sum(x.value for x in llm.get_metrics()
                   if x.name == "vllm:spec_decode_num_drafts")

    first = gen(tp)                               # compiles, captures
    if not spec:
        save_replay(replay, prompts,
                    [list(o.outputs[0].token_ids) for o in first])
    d0 = drafts()
    t = time.perf_counter()
    outs = gen(tp)
    wall = time.perf_counter() - t
    rounds = drafts() - d0
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True,
                         detokenize=False)
    t1 = time.perf_counter()
    for p in tp:
        llm.generate([p], one, use_tqdm=False)
    prefill = time.perf_counter() - t1
    decode_rounds = rounds or len(tp) * (max_new - 1)
    same = [list(o.outputs[0].token_ids) for o in outs] == \
        [list(o.outputs[0].token_ids) for o in first]
    res = dict(engine=which, budget=budget, prompts=len(tp), max_new=max_new,
               prefill_s=prefill,
               decode_ms_per_round=1e3 * (wall - prefill) / max(decode_rounds, 1),
               wall_s=wall, rounds=rounds,
               ms_per_round=1e3 * wall / max(rounds or len(tp) * max_new, 1),
               tok_s=len(tp) * max_new / wall, repeat_identical=same,
               device=torch.cuda.get_device_name(0),
               date=time.strftime("%Y-%m-%d"))
    print(json.dumps(res), flush=True)
    if os.environ.get("TRACE8B_PROFILE", "1") == "0":
        # The timed rows only (the profiled generate with Python stacks
        # takes longer than the rest of the run together).
        with open(os.path.join(out, f"trace8b_{which}.txt"), "w") as f:
            f.write(json.dumps(res) + "\n")
        return

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 with_stack=True) as p:
        d0 = drafts()
        gen(tp[:1])
        res["profiled_rounds"] = drafts() - d0
    raw = os.path.join(out, f"trace8b_{which}.json")
    p.export_chrome_trace(raw)
    with open(raw) as f:
        events = json.load(f)["traceEvents"]
    with open(raw, "rb") as f, gzip.open(raw + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    idle = idle_attribution(events)
    kern = kernel_table(events)
    steps = res["profiled_rounds"] or max_new
    res.update(profiled_steps=steps,
               busy_ms_per_step=idle["busy_us"] / 1e3 / steps,
               window_ms_per_step=idle["window_us"] / 1e3 / steps,
               idle_ms_per_step=idle["idle_us"] / 1e3 / steps,
               gaps_per_step=idle["gaps"] / steps)
    with open(os.path.join(out, f"trace8b_{which}.txt"), "w") as f:
        f.write(json.dumps(res) + "\n\n")
        write_tables(f, idle, kern, "whole profiled generate")
    os.remove(raw)
    with open(raw, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
