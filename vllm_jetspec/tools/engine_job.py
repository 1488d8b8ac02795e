"""Run one vLLM engine on a batch plan in a fresh process; used by the
sweep and the demo (each engine needs its own process: vLLM holds global
state, and a plugin-patched engine must not share one with a plain one).

    python -m vllm_jetspec.tools.engine_job OUT.json < job.json

The result goes to a file, not stdout: vLLM's engine-core process logs to
the same pipe, and a long line may be interleaved with its writes.

Job keys: ``target``, ``spec`` (speculative_config or null), ``prompts``
(token id lists) or ``prompt_sets`` (name -> token id lists: several
datasets through one engine), ``batch_sizes``, ``max_new_tokens``, optional ``engine``
(extra ``LLM`` kwargs), ``env`` (environment variables set in the
engine's process first), ``ignore_eos``, ``skip_tokenizer`` (no tokenizer:
token ids in and out), ``profile`` (measure the round-time split, see
``vllm_patches/profile.py``), ``warmup_runs`` (untimed warm-up batches per
batch size, default 1), ``trace`` (``{"profiler": "torch" | "cuda", "dir":
DIR, "max_tokens": N}``: after the timed runs, vLLM's profiler around one
more batch of the first batch size, N new tokens, i.e. a few rounds; the
torch profiler's traces go to DIR). ``JETSPEC_JIT_VERBOSE=1`` in the environment
turns on vLLM's ``jit_monitor_verbose`` (every Triton compilation after
warm-up logged with its specialisation). For each batch size B the prompts run in groups of
B (one ``generate`` call per group, so B requests decode together); the
result per B holds the output ids, generated tokens, wall seconds and the
spec-decode counters of that part (drafts, accepted tokens) and, with
``profile``, the runner's step count and seconds per segment (without it,
only the count of CUDA-graph modes the target's forwards were dispatched
to, ``graph_modes``, which rows carry when non-empty). With
``prompt_sets`` the result's ``sets`` holds that per set (and ``batches``
the first set's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def _spec_counters(llm) -> dict:
    m = {}
    for x in llm.get_metrics():
        if x.name in ("vllm:spec_decode_num_drafts",
                      "vllm:spec_decode_num_accepted_tokens"):
            m[x.name.rsplit("_num_", 1)[1]] = x.value
    return m


def _run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # Per engine, before vLLM reads it (e.g. VLLM_USE_V2_MODEL_RUNNER).
    os.environ.update(job.get("env") or {})
    kw = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=2048, disable_log_stats=False)
    kw.update(job.get("engine") or {})
    tok = not job.get("skip_tokenizer")
    if not tok:
        kw["skip_tokenizer_init"] = True
    if job.get("profile"):
        # Read by the runner hooks in this process and the engine core's.
        os.environ["JETSPEC_PROFILE"] = "1"
    if os.environ.get("JETSPEC_JIT_VERBOSE") == "1":
        # vLLM's JIT monitor logs every kernel compiled after warm-up, with
        # its specialisation (by default only the first per kernel name).
        kw.setdefault("jit_monitor_verbose", True)

    def profile(reset):
        """The runner's profile (without ``job["profile"]`` only its count
        of CUDA-graph modes, which needs no timing)."""
        prof = llm.collective_rpc("jetspec_profile",
                                  kwargs=dict(reset=reset))[0]
        if job.get("profile"):
            return prof
        return dict(graph_modes=prof.get("graph_modes") or {})

    trace = job.get("trace")
    if trace:
        kw["profiler_config"] = dict(profiler=trace["profiler"])
        if trace["profiler"] == "torch":
            kw["profiler_config"].update(torch_profiler_dir=trace["dir"],
                                         torch_profiler_with_stack=False)
    t0 = time.perf_counter()
    llm = LLM(job["target"], speculative_config=job["spec"], **kw)
    start_s = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=job["max_new_tokens"], temperature=0,
                        ignore_eos=job.get("ignore_eos", False),
                        detokenize=tok)
    sets = {k: [TokensPrompt(prompt_token_ids=p) for p in v]
            for k, v in (job.get("prompt_sets")
                         or {"": job["prompts"]}).items()}
    # Untimed requests first, one batch per batch size: lazy initialisation
    # and the JIT compilations of each batch shape (Triton specialises on
    # sizes) stay out of the timings. Eight tokens: a prefill and at least
    # one speculative round with every request of the batch.
    for _ in range(job.get("warmup_runs", 1)):
        for B in job["batch_sizes"]:
            llm.generate(next(iter(sets.values()))[:B], SamplingParams(
                max_tokens=8, ignore_eos=True, detokenize=tok),
                use_tqdm=False)
    res = {k: _batches(llm, job, prompts, sp, profile)
           for k, prompts in sets.items()}
    out = dict(start_seconds=start_s, batches=next(iter(res.values())),
               # the job's variables as this process (and the engine core
               # it started) had them
               env={k: os.environ.get(k) for k in job.get("env") or {}})
    if trace:
        # Outside the timed runs: the profiler slows every step it sees.
        B = job["batch_sizes"][0]
        llm.start_profile()
        llm.generate(next(iter(sets.values()))[:B], SamplingParams(
            max_tokens=trace.get("max_tokens", 16), ignore_eos=True,
            detokenize=tok), use_tqdm=False)
        llm.stop_profile()
        out["trace_dir"] = trace.get("dir")
    if job.get("prompt_sets"):
        out["sets"] = res
    return out


def _batches(llm, job, prompts, sp, profile) -> dict:
    out = {}
    for B in job["batch_sizes"]:
        before = _spec_counters(llm)
        profile(reset=True)
        ids, secs = [], 0.0
        for i in range(0, len(prompts), B):
            t = time.perf_counter()
            res = llm.generate(prompts[i:i + B], sp, use_tqdm=False)
            secs += time.perf_counter() - t
            ids += [list(r.outputs[0].token_ids) for r in res]
        after = _spec_counters(llm)
        prof = profile(reset=True)
        out[str(B)] = dict(
            profile=prof,
            ids=ids, tokens=sum(len(x) for x in ids), seconds=secs,
            drafts=after.get("drafts", 0) - before.get("drafts", 0),
            accepted=(after.get("accepted_tokens", 0)
                      - before.get("accepted_tokens", 0)))
    return out


def first_differences(ids: list[list[int]],
                      base: list[list[int]]) -> dict[int, int]:
    """{prompt index: first token position where ``ids`` and ``base``
    differ} for the prompts whose outputs differ (a shorter output differs
    where it ends; ``soak.first_diff``)."""
    from .soak import first_diff

    diffs = (first_diff(a, b) for a, b in zip(ids, base))
    return {j: d for j, d in enumerate(diffs) if d is not None}


def result_rows(method: str, budget: int, res: dict, ar: dict,
                prompt_set: str | None = None) -> list[dict]:
    """One row per batch size of an engine's result (of ``prompt_set``
    when given: then the rows carry it as ``dataset``), against the AR
    engine's result of the same run: tau (vLLM's spec-decode metrics:
    tokens per target forward, bonus included), output tok/s, speed-up over
    AR, whether the token ids equal AR's, and the raw counts."""
    rows = []
    batches, ar_batches = res["batches"], ar["batches"]
    if prompt_set is not None:
        batches = res["sets"][prompt_set]
        ar_batches = ar["sets"][prompt_set]
    for B, r in batches.items():
        base = ar_batches[B]
        tok_s = r["tokens"] / r["seconds"] if r["seconds"] else 0.0
        ar_s = base["tokens"] / base["seconds"] if base["seconds"] else 0.0
        rows.append(dict(
            method=method, budget=budget, batch=int(B),
            tau=(1 + r["accepted"] / r["drafts"]) if r["drafts"] else 1.0,
            tok_s=tok_s, speedup=tok_s / ar_s if ar_s else 0.0,
            identical_to_ar=r["ids"] == base["ids"], tokens=r["tokens"],
            seconds=r["seconds"], rounds=r["drafts"]))
        if r["ids"] != base["ids"]:
            # where to look for the near-tie (scripts/gpu/diverge.py)
            rows[-1]["differs_at"] = first_differences(r["ids"],
                                                       base["ids"])
        modes = (r.get("profile") or {}).get("graph_modes")
        if modes:
            rows[-1]["graph_modes"] = dict(sorted(modes.items()))
        if prompt_set is not None:
            rows[-1] = dict(dataset=prompt_set, **rows[-1])
    return rows


def run_job(job: dict, timeout: float | None = None) -> dict:
    """Run ``job`` in a subprocess; returns its result or raises
    ``RuntimeError`` with the end of the engine's log."""
    fd, out = tempfile.mkstemp(prefix="jetspec_engine_job_", suffix=".json")
    os.close(fd)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_jetspec.tools.engine_job", out],
            input=json.dumps(job), capture_output=True, text=True,
            timeout=timeout)
        log = proc.stdout + proc.stderr
        with open(out) as f:
            text = f.read()
    finally:
        os.unlink(out)
    if proc.returncode or not text:
        fd, path = tempfile.mkstemp(prefix="jetspec_engine_job_",
                                    suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(log)
        raise RuntimeError(f"engine job failed ({proc.returncode}); full log "
                           f"in {path}; its end:\n" + log[-3000:])
    res = json.loads(text)
    res["log"] = log
    return res


def batched_tokens(budget: int, max_seqs: int, depth: int) -> int:
    """``max_num_batched_tokens`` for an engine of tree budget ``budget``
    (0: no speculation): room for a whole tree per sequence, plus the
    ``depth - 1`` slots per sequence vLLM keeps free for the draft pass
    (``VllmConfig`` subtracts them to get the scheduler's per-step budget;
    see ``vllm_patches.config.patched_max_num_new_slots_for_drafting``)."""
    tokens = max(2048, max_seqs * (budget + 1))
    if budget > 1:
        tokens += max_seqs * max(0, depth - 1)
    return tokens


def graph_sizes(budget: int, max_seqs: int) -> list[int]:
    """CUDA-graph capture sizes (tokens) for a speculative engine of
    ``budget`` tokens per request and step: a whole tree for 1, 2, 4, 8,
    16, 24, ... requests up to ``max_seqs`` (vLLM's batch buckets), so a
    verify step of any batch pads to a full graph. vLLM's default stops
    at 512 tokens (4 trees of 128), above which steps run eagerly."""
    buckets = [b for b in [1, 2, 4] + list(range(8, 256, 8))
               + list(range(256, max_seqs + 1, 16)) if b <= max_seqs]
    return sorted({budget * b for b in buckets + [max_seqs]})


def auto_graph_sizes(budgets: list[int], max_seqs: int) -> list[int]:
    """Capture sizes of a ``tree_budget: "auto"`` engine choosing among
    ``budgets``: ``graph_sizes`` of each and of 1 (plain steps), so a
    verify step of every budget and batch pads to a full graph of its own
    query length (``vllm_patches.budget_graphs``)."""
    return sorted({x for b in {1, *budgets}
                   for x in graph_sizes(b, max_seqs)})


if __name__ == "__main__":
    result = _run(json.load(sys.stdin))
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)

