"""Sweep tree budget x batch size through vLLM: tau, tok/s, speed-up.

    python -m vllm_jetspec.sweep --dataset gsm8k --budgets 16 64 128 \\
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
import time

from .bench import _device, load_ar, save_ar
from .engine_job import batched_tokens, graph_sizes, result_rows, run_job

DATASETS = {"math": "math500_subset311", "humaneval": "humaneval",
            "gsm8k": "gsm8k", "mtbench": "mtbench"}
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_jetspec.sweep",
                                 description=__doc__,
                                 formatter_class=argparse.
                                 RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=sorted(DATASETS), nargs="+",
                     default=["gsm8k"])
    src.add_argument("--prompts", nargs="+",
                     help="JSONL file(s) with a 'prompt' field")
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--tree-algo", default="accum_logp")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--baseline", choices=["chain", "dflash", "none"],
                    default="chain")
    ap.add_argument("--target", default=None,
                    help="HF model dir (default: the SmolLM2 asset)")
    ap.add_argument("--head", default=None,
                    help="head dir (default: the shipped SmolLM2 head)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--no-chat", action="store_true",
                    help="do not apply the chat template")
    ap.add_argument("--graphs", action="store_true",
                    help="enforce_eager=False for every engine (GPU: "
                         "torch.compile + CUDA graphs; default eager)")
    ap.add_argument("--ar-from", default=None, metavar="AR_JSON",
                    help="reuse an earlier sweep's plain-decoding result "
                         "(its ar.json; same prompts and settings)")
    ap.add_argument("--out", default="sweep")
    args = ap.parse_args(argv)

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from . import assets
    from .eval_tau import encode_prompts
    from .head import HeadConfig
    from .heads import shipped_head_dir

    target = args.target or str(assets.default_model_dir())
    head = args.head or str(shipped_head_dir())
    tok = AutoTokenizer.from_pretrained(target)
    if args.prompts:
        sources = {os.path.splitext(os.path.basename(p))[0]: p
                   for p in args.prompts}
        if len(sources) < len(args.prompts):
            ap.error("--prompts: two files with the same name")
    else:
        sources = {d: DATASETS[d] for d in dict.fromkeys(args.dataset)}
    prompt_sets = {
        name: encode_prompts(assets.load_prompts(src, limit=args.num_prompts),
                             tok, chat=not args.no_chat)
        for name, src in sources.items()}
    depth = HeadConfig.from_json(os.path.join(head, "config.json")) \
        .block_size - 1
    maxB = max(args.batch_sizes)
    os.makedirs(args.out, exist_ok=True)

    def job(spec, budget):
        engine = dict(dtype=args.dtype, max_model_len=args.max_model_len,
                      max_num_seqs=maxB, enforce_eager=not args.graphs,
                      max_num_batched_tokens=batched_tokens(budget, maxB,
                                                            depth))
        if args.graphs and budget > 1:
            engine["compilation_config"] = dict(
                cudagraph_capture_sizes=graph_sizes(budget, maxB))
        return dict(target=target, spec=spec, prompt_sets=prompt_sets,
                    batch_sizes=args.batch_sizes,
                    max_new_tokens=args.max_new_tokens, engine=engine)

    plan = [("ar", 0, None)]
    if args.baseline == "chain":
        plan.append(("chain", depth + 1, {
            "method": "jetspec", "model": head, "tree_algo": "chain",
            "tree_budget": depth + 1}))
    elif args.baseline == "dflash":
        plan.append(("dflash", depth + 1, {
            "method": "dflash", "model": head,
            "num_speculative_tokens": depth}))
    plan += [("jetspec", b, {"method": "jetspec", "model": head,
                             "tree_budget": b, "tree_algo": args.tree_algo})
             for b in args.budgets]
    rows, ar = [], None
    t0 = time.perf_counter()
    bar = tqdm(plan, desc="sweep engines")
    for method, budget, spec in bar:
        bar.set_postfix(method=method, budget=budget)
        if method == "ar" and args.ar_from:
            res = load_ar(args.ar_from, job(None, 0))
        else:
            res = run_job(job(spec, budget))
        if method == "ar":
            ar = res
            save_ar(os.path.join(args.out, "ar.json"), res, job(None, 0))
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
    return 0 if all(r["identical_to_ar"] for r in rows) else 1

if __name__ == "__main__":
    raise SystemExit(main())
