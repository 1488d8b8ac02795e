"""Round cost and throughput of stock AR, linear DFlash and jetspec, in one
run of one command.

    python -m vllm_jetspec.tools.bench --budgets 16 64 --batch-sizes 1 4
    python -m vllm_jetspec.tools.bench --replay --target DIR --head DIR \\
        --load-format dummy --dtype bfloat16 --prompt-len 512 \\
        --max-new-tokens 256 --budgets 16 32 64 128 256 --batch-sizes 1 8 32

Engines, one after the other, each in its own process (vLLM keeps global
state per process; see ``engine_job``): plain decoding (AR: the reference
for speed-up and tokens), the linear baseline with the same head, then
jetspec at each budget. Every engine decodes the same prompts greedily for
``--max-new-tokens`` tokens (EOS ignored, so every request has the same
length) at every batch size. Per (method, budget, batch): tok/s, speed-up
over AR, τ (vLLM's spec-decode metrics; tokens per target forward, bonus
included), whether the tokens equal AR's, and the round time split
measured inside the model runner (``vllm_patches/profile.py``): prepare,
verify (the target's forward), accept (sampling, acceptance, KV
compaction), draft (the head's forward), tree (construction and masks),
other (scheduler, output processing: the rest of the wall time per step)
-- on the V1 runner; vLLM's V2 runner and stock engines give the round
only (its segment columns print "-"; ``scripts/gpu/trace.py`` splits one).

``--replay``: the AR engine's outputs are written to ``replay.json`` and the
drafters of the speculative engines put the target's recorded continuation
first in their top-K (``vllm_jetspec.replay``), so τ is min(budget, depth + 1)
wherever the target reproduces its own tokens: round cost can be measured
on dummy weights, where real acceptance means nothing. vLLM's own dflash
method has no replay, so the linear baseline is then jetspec's ``chain``
(one branch of the head's depth) through the same runner.

``--graphs``: every engine runs with ``enforce_eager=False`` (on a GPU:
torch.compile and CUDA graphs; jetspec's verify steps replay full graphs
when every request verifies a whole tree of budget nodes, else piecewise
graphs with the tree attention between the pieces, see
``vllm_patches.triton_attention``; the rows' ``graph_modes`` count which);
then the AR row is stock vLLM. Without it every engine
runs eagerly (on CPU vLLM has no graphs: leave it off there).

``--stock-ar``: one more plain-decoding engine with vLLM's own defaults
(``enforce_eager=False``), row ``ar_graphs``, next to the eager engines
(redundant with ``--graphs``).

``--ar-from PATH``: the plain-decoding engine's result of an earlier run
(its ``ar.json``, written by every run) instead of running it again, for
machines with short calls; the prompts, token counts, batch sizes and
engine settings must be the same (checked).

``--resume``: reuse the rows (and the AR result) that an earlier run with
the same prompts and settings left in ``--out`` (its ``partial.json``,
written after every engine) and run only the engines it lacks: a sweep
split over several calls of a machine with short calls (the auto
engine's cost model then holds every static row).

``--runners v2 v1``: every engine on vLLM's V2 runner (CUDA's default:
async scheduling; jetspec's device-side rounds, ``vllm_patches.v2``) and
again on V1 (``VLLM_USE_V2_MODEL_RUNNER=0``, async scheduling off), rows of
the second named ``METHOD@v1``. V2 engines have no timed segments (a timed
segment waits for the device): their ms per step comes from the output
(prefill steps included) and their split columns are 0.

``--variant LABEL:KEY=VALUE[,KEY=VALUE...]`` (repeatable): every jetspec
budget once more with those environment variables set in its engine's
process, rows named ``jetspec~LABEL``: a jetspec switch against the
default in one run on one machine (e.g. ``torchrows:JETSPEC_VERIFY_ROWS=
torch``), for one AR and one baseline engine instead of two runs'.

``--auto``: after the static budgets, one more engine with
``"tree_budget": "auto"`` (``vllm_jetspec.autobudget``) whose cost model is
this run's own measurements; its row shows which budgets it chose.
``--auto-online``: one more with ``"tree_budget": "auto"`` and no cost
model (``autobudget.OnlineBudgetPolicy``: it measures while serving), up
to the largest of ``--budgets``: row ``auto_online``.

Writes ``bench.json`` (settings, rows, per-engine start-up seconds),
``bench.csv``, ``bench.png`` and ``cost_model.json`` (AR and jetspec round
times per budget and batch size: the input of ``tree_budget: "auto"``) to
``--out``. Exit status 1 if a
speculative output differs from AR's (not with ``--load-format dummy``,
where near-tied logits of random weights may legitimately flip under a
different batch shape; the mismatches are still reported).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

from .engine_job import (auto_graph_sizes, batched_tokens, graph_sizes,
                         result_rows, run_job)

SEGMENTS = ("prepare", "verify", "accept", "draft", "tree", "other")
FIELDS = ["method", "budget", "batch", "replay", "tau", "tok_s", "speedup",
          "identical_to_ar", "steps", "round_ms"] + \
    [f"{s}_ms" for s in SEGMENTS] + ["segments_timed", "tokens", "seconds"]


def parse_variants(specs: list[str]) -> dict[str, dict[str, str]]:
    """``--variant`` values -> {label: {variable: value}}; one clear error
    for a malformed one."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        label, sep, rest = spec.partition(":")
        env = dict(kv.partition("=")[::2] for kv in rest.split(",") if kv)
        if not sep or not label.isidentifier() or not env or \
                any(not k.isidentifier() for k in env) or label in out:
            raise ValueError(
                f"--variant {spec!r}: want LABEL:KEY=VALUE[,KEY=VALUE...] "
                "with a new word for LABEL and variable names for KEY")
        out[label] = env
    return out


def format_table(rows: list[dict]) -> str:
    """The rows as the bench prints them. A round the runner did not split
    (vLLM's V2 runner, stock engines) shows "-" in the segment columns,
    not zeros."""
    lines = [f"{'method':8} {'budget':>6} {'batch':>5} {'tau':>6} "
             f"{'tok/s':>8} {'speedup':>7} {'round':>8} " + " ".join(
                 f"{s:>7}" for s in SEGMENTS)
             + "  same-as-AR   (ms per step)"]
    for r in rows:
        timed = r.get("segments_timed", True)
        lines.append(
            f"{r['method']:8} {r['budget']:6d} {r['batch']:5d} "
            f"{r['tau']:6.2f} {r['tok_s']:8.1f} {r['speedup']:7.2f} "
            f"{r['round_ms']:8.2f} " + " ".join(
                f"{r[f'{s}_ms']:7.2f}" if timed else f"{'-':>7}"
                for s in SEGMENTS) + f"  {r['identical_to_ar']}")
    if not all(r.get("segments_timed", True) for r in rows):
        lines.append("(-: a round not split into segments: vLLM's V2 runner "
                     "and stock engines; scripts/gpu/trace.py splits one)")
    return "\n".join(lines)


def rows_of(method: str, budget: int, replay: bool, res: dict,
            ar: dict) -> list[dict]:
    """``engine_job.result_rows`` plus the round-time split per step."""
    rows = result_rows(method, budget, res, ar)
    for row, r in zip(rows, res["batches"].values()):
        prof = r.get("profile") or {}
        steps = prof.get("steps") or 0
        if not steps:
            # No runner profile (vLLM's V2 runner, stock engines): steps
            # from the output. Each group of ``batch`` requests takes one
            # prefill step and then one step per round: a speculative
            # engine's rounds are its drafts (one per request and round),
            # a plain engine's the tokens after the first.
            B = row["batch"]
            groups = -(-len(r["ids"]) // B)
            steps = round(groups + (r["drafts"] if r["drafts"]
                                    else r["tokens"] - len(r["ids"])) / B)
        row.update(replay=replay, steps=steps,
                   round_ms=1e3 * r["seconds"] / steps if steps else 0.0)
        secs = prof.get("seconds") or {}
        # Whether the runner timed its segments (V1 hooks); V2 and stock
        # engines give the round only: its columns print "-", not 0.
        row["segments_timed"] = bool(secs)
        for s in SEGMENTS[:-1]:
            row[f"{s}_ms"] = 1e3 * secs.get(s, 0.0) / steps if steps else 0.0
        row["other_ms"] = max(0.0, row["round_ms"] - sum(
            row[f"{s}_ms"] for s in SEGMENTS[:-1]))
        if prof.get("graph_modes"):
            row["graph_modes"] = dict(sorted(prof["graph_modes"].items()))
        if prof.get("draft_modes"):
            row["draft_modes"] = dict(sorted(prof["draft_modes"].items()))
        if prof.get("stats"):
            row["segment_stats"] = prof["stats"]
        if prof.get("alloc"):
            row["alloc"] = prof["alloc"]
        if "budgets" in prof:
            row["auto_budgets"] = {int(k): v for k, v in
                                   sorted(prof["budgets"].items(),
                                          key=lambda kv: int(kv[0]))}
            row["auto_calibration"] = prof.get("calibration")
    return rows


def plot(rows: list[dict], path: str, title: str = "") -> str | None:
    """tok/s vs budget (one line per batch size, AR and baseline dashed) and
    the round-time split of every engine and batch size, as one PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed, no plot "
              "(pip install 'vllm-jetspec[plots]')")
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5),
                               gridspec_kw=dict(width_ratios=[1, 1.6]))
    js = [r for r in rows if r["method"] == "jetspec"]
    for B in sorted({r["batch"] for r in rows}):
        pts = sorted((r["budget"], r["tok_s"]) for r in js if r["batch"] == B)
        line = a.plot(*zip(*pts), marker="o", label=f"jetspec, batch {B}") \
            if pts else a.plot([], [])
        for r in rows:
            if r["batch"] == B and r["method"] != "jetspec":
                a.axhline(r["tok_s"], color=line[0].get_color(),
                          ls="--" if r["method"] == "ar" else ":", lw=1,
                          label=f"{r['method']}, batch {B}")
    a.set_xscale("log", base=2)
    a.set_xlabel("tree budget (nodes)")
    a.set_ylabel("output tok/s")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    labels = [f"{r['method']}{r['budget'] or ''}\nB{r['batch']}"
              for r in rows]
    bottom = [0.0] * len(rows)
    timed = [r.get("segments_timed", True) for r in rows]
    for s in SEGMENTS:
        vals = [r[f"{s}_ms"] if t else 0.0 for r, t in zip(rows, timed)]
        b.bar(range(len(rows)), vals, bottom=bottom, label=s)
        bottom = [x + y for x, y in zip(bottom, vals)]
    if not all(timed):
        b.bar(range(len(rows)), [0.0 if t else r["round_ms"]
                                 for r, t in zip(rows, timed)],
              bottom=bottom, color="0.6", label="round (not split)")
    b.set_xticks(range(len(rows)), labels, fontsize=6)
    b.set_ylabel("ms per engine step (round)")
    b.legend(fontsize=7)
    b.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ar_key(job: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()) \
        .hexdigest()


def save_ar(path: str, res: dict, job: dict) -> None:
    """The AR engine's result with a digest of its job (prompts, lengths,
    batch sizes, engine settings), for ``--ar-from``."""
    with open(path, "w") as f:
        json.dump(dict(job_sha256=_ar_key(job), result=res), f)


def load_ar(path: str, job: dict) -> dict:
    with open(path) as f:
        d = json.load(f)
    if d.get("job_sha256") != _ar_key(job):
        raise SystemExit(
            f"--ar-from {path} was recorded with other prompts or "
            f"settings than this run's; run without --ar-from")
    return d["result"]


def _resumed(out: str, run_key: str) -> dict:
    """``(method, budget) -> (rows, start seconds)`` of the engines an
    earlier run with the same ``run_key`` finished in ``out`` (none if it
    left no ``partial.json``); another run's file is refused."""
    path = os.path.join(out, "partial.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        d = json.load(f)
    meta = d.get("meta") or {}
    if meta.get("run_sha256") != run_key:
        raise SystemExit(
            f"--resume: {path} was written with other prompts or settings "
            f"than this run's; use another --out or run without --resume")
    done: dict = {}
    for r in d.get("rows") or []:
        key = (r["method"], r["budget"])
        start = (meta.get("engine_start_seconds") or {}).get(
            f"{r['method']}{r['budget'] or ''}", 0.0)
        done.setdefault(key, ([], start))[0].append(r)
    return done


def _cost_model(rows: list[dict], meta: dict):
    from ..autobudget import CostModel
    return CostModel.from_bench_rows(rows, meta)


def synthetic_prompts(n: int, length: int, vocab: int,
                      seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` random token ids (for dummy weights,
    where only lengths matter); ids avoid the first and last 10% of the
    vocabulary (special tokens usually live there)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lo, hi = vocab // 10, vocab - vocab // 10
    return torch.randint(lo, hi, (n, length), generator=g).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_jetspec.tools.bench",
                                 description=__doc__,
                                 formatter_class=argparse.
                                 RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None,
                    help="HF model dir (default: the SmolLM2 asset)")
    ap.add_argument("--head", default=None,
                    help="head dir (default: the shipped SmolLM2 head)")
    ap.add_argument("--load-format", default="auto",
                    help="'dummy': random weights for target and head "
                         "(timing only)")
    ap.add_argument("--dtype", default="float32")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--dataset", default="gsm8k",
                     choices=["gsm8k", "math", "humaneval", "mtbench"])
    src.add_argument("--prompts", help="JSONL with a 'prompt' field")
    src.add_argument("--prompt-len", type=int,
                     help="synthetic prompts of this many random tokens")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="default: the largest batch size")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    ap.add_argument("--tree-algo", default="accum_logp")
    ap.add_argument("--replay", action="store_true",
                    help="drafters replay the target's recorded output")
    ap.add_argument("--graphs", action="store_true",
                    help="every engine with enforce_eager=False (GPU: "
                         "torch.compile + CUDA graphs)")
    ap.add_argument("--stock-ar", action="store_true",
                    help="also plain decoding with vLLM's defaults (CUDA "
                         "graphs, torch.compile): row 'ar_graphs'")
    ap.add_argument("--ar-from", default=None, metavar="AR_JSON",
                    help="reuse the AR engine's result (ar.json) of an "
                         "earlier run with the same settings")
    ap.add_argument("--resume", action="store_true",
                    help="keep the engines an earlier run with the same "
                         "settings finished in --out (its partial.json)")
    ap.add_argument("--auto", action="store_true",
                    help="also run tree_budget 'auto' on this run's costs")
    ap.add_argument("--auto-online", action="store_true",
                    help="also run tree_budget 'auto' without a cost model "
                         "(it measures while serving), up to the "
                         "largest of --budgets: row 'auto_online'")
    ap.add_argument("--runners", nargs="+", choices=["v2", "v1"],
                    default=["v2"],
                    help="vLLM model runners to run every engine on (CUDA): "
                         "v2 (vLLM's default there: async scheduling; "
                         "jetspec's device-side rounds) and/or v1 "
                         "(VLLM_USE_V2_MODEL_RUNNER=0, async scheduling "
                         "off; rows named METHOD@v1). On CPU only v1 "
                         "exists, whatever this says")
    ap.add_argument("--variant", action="append", default=[],
                    metavar="LABEL:KEY=VALUE[,KEY=VALUE...]",
                    help="every jetspec budget again with these "
                         "environment variables in its engine (rows "
                         "'jetspec~LABEL'); repeatable")
    ap.add_argument("--baseline", choices=["dflash", "chain", "none"],
                    nargs="+", default=None,
                    help="linear baselines with the same head: vLLM's own "
                         "dflash, jetspec's chain (one branch of the "
                         "head's depth), or none. Default: dflash, or chain "
                         "with --replay (dflash cannot replay; named "
                         "explicitly with --replay it still runs, for its "
                         "round cost)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--no-split", action="store_true",
                    help="no round-time split (no device syncs)")
    ap.add_argument("--no-chat", action="store_true",
                    help="dataset prompts without the chat template")
    ap.add_argument("--out", default="bench")
    args = ap.parse_args(argv)
    try:
        variants = parse_variants(args.variant)
    except ValueError as e:
        ap.error(str(e))

    from tqdm import tqdm
    from transformers import AutoConfig

    from . import assets
    from ..autobudget import online_budgets
    from ..head import HeadConfig
    from ..heads import shipped_head_dir
    from ..replay import save_replay
    from .sweep import DATASETS

    target = args.target or str(assets.default_model_dir())
    head = args.head or str(shipped_head_dir())
    depth = HeadConfig.from_json(os.path.join(head, "config.json")) \
        .block_size - 1
    maxB = max(args.batch_sizes)
    n = args.num_prompts or maxB
    if args.prompt_len:
        vocab = AutoConfig.from_pretrained(target).vocab_size
        prompts = synthetic_prompts(n, args.prompt_len, vocab)
        source = f"synthetic, {args.prompt_len} tokens"
    else:
        from transformers import AutoTokenizer

        from .eval_tau import encode_prompts
        source = args.prompts or DATASETS[args.dataset]
        prompts = encode_prompts(assets.load_prompts(source, limit=n),
                                 AutoTokenizer.from_pretrained(target),
                                 chat=not args.no_chat)
    os.makedirs(args.out, exist_ok=True)
    replay_path = os.path.abspath(os.path.join(args.out, "replay.json"))
    dummy = args.load_format == "dummy"

    def job(spec, budget, eager=True, auto=None, runner="v2", env=None):
        """An engine job; ``auto``: the budgets a tree_budget 'auto'
        engine chooses among (graphs for each); ``env``: a variant's
        environment variables."""
        engine = dict(dtype=args.dtype, max_model_len=args.max_model_len,
                      enforce_eager=eager and not args.graphs,
                      max_num_seqs=maxB, load_format=args.load_format,
                      max_num_batched_tokens=batched_tokens(budget, maxB,
                                                            depth))
        if args.gpu_memory_utilization is not None:
            engine["gpu_memory_utilization"] = args.gpu_memory_utilization
        if args.graphs and budget > 1:
            # A verify step of any batch size pads to a full graph, and so
            # does the V2 runner's draft pass (1 + depth tokens a request).
            sizes = auto_graph_sizes(auto, maxB) if auto \
                else graph_sizes(budget, maxB)
            engine["compilation_config"] = dict(
                cudagraph_capture_sizes=sorted(
                    set(sizes) | set(graph_sizes(depth + 1, maxB))))
        env = dict(env or {})
        if runner == "v1":
            env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            engine["async_scheduling"] = False
        return dict(target=target, spec=spec, prompts=prompts, env=env,
                    batch_sizes=args.batch_sizes, ignore_eos=True,
                    max_new_tokens=args.max_new_tokens, engine=engine,
                    profile=not args.no_split,
                    # Synthetic prompts need no tokenizer (dummy shapes
                    # may come as a config.json alone).
                    skip_tokenizer=bool(args.prompt_len))

    def jetspec(budget, algo):
        spec = {"method": "jetspec", "model": head, "tree_budget": budget,
                "tree_algo": algo}
        if args.replay:
            spec["replay"] = replay_path
        return spec

    baselines = args.baseline or ["chain" if args.replay else "dflash"]
    core = [("ar", 0, None)]
    if args.stock_ar:
        core.append(("ar_graphs", 0, None))
    if "chain" in baselines:
        core.append(("chain", depth + 1, jetspec(depth + 1, "chain")))
    if "dflash" in baselines:
        core.append(("dflash", depth + 1, {
            "method": "dflash", "model": head,
            "num_speculative_tokens": depth}))
    core += [("jetspec", b, jetspec(b, args.tree_algo))
             for b in args.budgets]
    core += [(f"jetspec~{label}", b, jetspec(b, args.tree_algo))
             for label in variants for b in args.budgets]
    # The first runner's AR row is the reference; the other runner's rows
    # are named METHOD@RUNNER.
    plan = [(m if r == args.runners[0] else f"{m}@{r}", b, spec)
            for r in args.runners for m, b, spec in core]
    baseline = "+".join(baselines)
    cost_path = os.path.abspath(os.path.join(args.out, "cost_model.json"))
    if args.auto:
        auto = jetspec(max(args.budgets), args.tree_algo)
        auto.update(tree_budget="auto", cost_model=cost_path)
        plan.append(("auto", max(args.budgets), auto))
    if args.auto_online:
        online = jetspec(max(args.budgets), args.tree_algo)
        online.update(tree_budget="auto", tree_budget_max=max(args.budgets))
        plan.append(("auto_online", max(args.budgets), online))
    # The budgets each auto engine chooses among (graphs for each).
    auto_budgets = {"auto": args.budgets,
                    "auto_online": online_budgets(max(args.budgets))}
    rows, ar, starts = [], None, {}
    # What makes rows of two runs comparable: the AR job (prompts, lengths,
    # batch sizes, engine settings) and the jetspec settings of every row.
    run_key = _ar_key(dict(ar=job(None, 0), algo=args.tree_algo,
                           replay=args.replay, split=not args.no_split,
                           depth=depth,
                           **({"variants": variants} if variants else {})))
    done = _resumed(args.out, run_key) if args.resume else {}

    def meta_now():
        return dict(target=target, head=head, dtype=args.dtype,
                    run_sha256=run_key,
                    load_format=args.load_format, device=_device(),
                    mean_prompt_tokens=sum(map(len, prompts)) / len(prompts),
                    max_new_tokens=args.max_new_tokens,
                    tree_algo=args.tree_algo, replay=args.replay,
                    graphs=args.graphs,
                    date=time.strftime("%Y-%m-%d"))

    t0 = time.perf_counter()
    bar = tqdm(plan, desc="bench engines")
    for method, budget, spec in bar:
        bar.set_postfix(method=method, budget=budget)
        if (method, budget) in done:
            old_rows, old_start = done[(method, budget)]
            if method == "ar":
                ar = load_ar(os.path.join(args.out, "ar.json"), job(None, 0))
                if args.replay:
                    save_replay(replay_path, prompts, ar["batches"][
                        str(args.batch_sizes[0])]["ids"])
            rows += old_rows
            starts[f"{method}{budget or ''}"] = old_start
            print(f"bench: {method}{budget or ''} resumed from "
                  f"{args.out}/partial.json")
            continue
        if method == "auto":
            _cost_model(rows, meta_now()).save(cost_path)
        if method == "ar" and args.ar_from:
            res = load_ar(args.ar_from, job(None, 0))
        else:
            res = run_job(job(spec, budget, eager=method != "ar_graphs",
                              auto=auto_budgets.get(method),
                              runner=method.partition("@")[2] or
                              args.runners[0],
                              env=variants.get(method.partition("@")[0]
                                               .partition("~")[2])))
        if method == "ar":
            save_ar(os.path.join(args.out, "ar.json"), res, job(None, 0))
        starts[f"{method}{budget or ''}"] = round(res["start_seconds"], 1)
        # Each engine's log end, and the rows so far: what a run cut short
        # (a time limit) still leaves behind.
        with open(os.path.join(args.out, "engine_logs.txt"), "a") as f:
            env = " ".join(f"{k}={v}" for k, v in
                           (res.get("env") or {}).items())
            f.write(f"===== {method} {budget}{' ' + env if env else ''}\n"
                    f"{res['log'][-6000:]}\n")
        if method == "ar":
            ar = res
            if args.replay:
                first = ar["batches"][str(args.batch_sizes[0])]["ids"]
                save_replay(replay_path, prompts, first)
        rows += rows_of(method, budget, args.replay and method != "ar",
                        res, ar)
        with open(os.path.join(args.out, "partial.json"), "w") as f:
            json.dump(dict(meta=dict(meta_now(), engine_start_seconds=starts,
                                     wall_seconds=round(
                                         time.perf_counter() - t0, 1)),
                           rows=rows), f, indent=1)
    bar.close()
    _cost_model(rows, meta_now()).save(cost_path)

    with open(os.path.join(args.out, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in r.items()})
    import vllm
    import sys
    meta = dict(meta_now(),
                command="python -m vllm_jetspec.tools.bench " + " ".join(
                    sys.argv[1:] if argv is None else argv),
                prompts=source, num_prompts=len(prompts),
                prompt_tokens=[len(p) for p in prompts], depth=depth,
                baseline=baseline, split=not args.no_split,
                variants=variants,
                vllm=vllm.__version__, engine_start_seconds=starts,
                wall_seconds=round(time.perf_counter() - t0, 1))
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    png = plot(rows, os.path.join(args.out, "bench.png"), title=(
        f"{os.path.basename(target.rstrip('/'))} ({args.load_format}, "
        f"{args.dtype}), {source}, {args.max_new_tokens} new tokens, "
        f"{'replay, ' if args.replay else ''}{args.tree_algo}, "
        f"{meta['device']}, {meta['date']}"))

    print(format_table(rows))
    modes = [r for r in rows if r.get("graph_modes")]
    if modes:
        print("CUDA-graph mode of the target's forwards: " + "; ".join(
            f"{r['method']}{r['budget'] or ''} b{r['batch']} "
            + ", ".join(f"{k} {v}" for k, v in r["graph_modes"].items())
            for r in modes))
    drafts = [r for r in rows if r.get("draft_modes")]
    if drafts:
        print("draft passes (graph: one graph per shape; vllm: vLLM's "
              "propose): " + "; ".join(
                  f"{r['method']}{r['budget'] or ''} b{r['batch']} "
                  + ", ".join(f"{k} {v}" for k, v in r["draft_modes"].items())
                  for r in drafts))
    stats = [r for r in rows if r.get("segment_stats")]
    if stats:
        print("per span, median / p90 / max ms: " + "; ".join(
            f"{r['method']}{r['budget'] or ''} b{r['batch']} " + ", ".join(
                f"{seg} {v['median_ms']:.2f}/{v['p90_ms']:.2f}/"
                f"{v['max_ms']:.2f}" for seg, v in
                r["segment_stats"].items() if seg in (
                    "verify", "draft", "draft_prepare", "draft_inputs",
                    "draft_body"))
            for r in stats))
    alloc = [r for r in rows if r.get("alloc")]
    if alloc:
        print("caching allocator (cudaMalloc / cudaFree / retries): "
              + "; ".join(f"{r['method']}{r['budget'] or ''} b{r['batch']} "
                          f"{r['alloc']['num_device_alloc']} / "
                          f"{r['alloc']['num_device_free']} / "
                          f"{r['alloc']['num_alloc_retries']}"
                          for r in alloc))
    for r in rows:
        if r.get("auto_budgets"):
            what = ("accepted drafts a round at the best budget"
                    if r["method"] == "auto_online" else "head calibration")
            print(f"{r['method']}, batch {r['batch']}: steps per budget "
                  f"{r['auto_budgets']} (1 = plain decoding), {what} "
                  f"{r['auto_calibration']:.2f}")
    print(f"wrote {args.out}/bench.csv, bench.json, cost_model.json"
          + (", bench.png" if png else ""))
    same = all(r["identical_to_ar"] for r in rows)
    if not same:
        print("bench: some outputs differ from AR's"
              + (" (dummy weights: near-tied logits)" if dummy else ""))
        for r in rows:
            if r.get("differs_at"):
                print(f"  {r['method']} {r['budget']} batch {r['batch']}: "
                      "first differing token by prompt "
                      f"{r['differs_at']}")
    return 0 if same or dummy else 1


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from . import cpu_model
    # The model and the vector ISA torch dispatches to: vLLM's CPU kernels
    # differ by ISA (AVX-512/AMX against AVX2), and so does the cost of a
    # verify step against a plain one (results.md, 2026-12-01).
    return f"CPU ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, " \
           f"{os.cpu_count()} cores)"


if __name__ == "__main__":
    raise SystemExit(main())
