"""Time vLLM's CPU GEMM at a model's linear shapes, by rows per call.

    python -m vllm_jetspec.tools.cpu_gemm [--model DIR] [--rows 1 2 4 8 16]

A verify step multiplies every weight by as many rows as the step has
tokens (a tree's nodes); a plain decoding step by one. Speculation pays only
where a GEMM of a few rows costs little more than one of one row, i.e. where
the step reads its weights once either way. This measures that on this
machine, with the kernel vLLM's CPU backend uses for unquantized linear
layers (``vllm._custom_ops.onednn_mm``, as ``dispatch_cpu_unquantized_gemm``
sets it up), fp32, at the shapes of one forward of ``--model`` (every
decoder layer's q/k/v, o, gate/up and down projections, and the LM head):
milliseconds per forward by rows, and the ratio to one row. Threads: torch's
default unless ``--threads``. CPU only; needs vLLM's CPU build.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def linear_shapes(cfg: dict) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(in, out) of one decoder layer's projections, and of the LM head."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    layer = [(h, (heads + 2 * kv) * hd), (heads * hd, h), (h, 2 * inter),
             (inter, h)]
    return layer, (h, cfg["vocab_size"])


def time_ms(fn, iters: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return 1e3 * (time.perf_counter() - t) / iters


def measure(cfg: dict, rows: list[int], iters: int = 5) -> list[dict]:
    import torch
    from vllm import _custom_ops as ops

    layer, head = linear_shapes(cfg)
    g = torch.Generator().manual_seed(0)

    def handle(k, n):
        return ops.create_onednn_mm(torch.randn(n, k, generator=g).t(), 32)

    layers = [(handle(k, n), k) for k, n in layer]
    lm = handle(*head)
    L = cfg["num_hidden_layers"]
    out = []
    for m in rows:
        xs = {k: torch.randn(m, k, generator=g) for k in {k for _, k in layers}
              | {head[0]}}
        one = time_ms(lambda: [ops.onednn_mm(hd, xs[k], None)
                               for hd, k in layers], iters)
        lm_ms = time_ms(lambda: ops.onednn_mm(lm, xs[head[0]], None), iters)
        out.append(dict(rows=m, layers_ms=round(L * one, 2),
                        lm_head_ms=round(lm_ms, 2),
                        total_ms=round(L * one + lm_ms, 2)))
    base = out[0]["total_ms"] if out and out[0]["rows"] == 1 else None
    for r in out:
        r["vs_one_row"] = round(r["total_ms"] / base, 2) if base else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vllm_jetspec.tools.cpu_gemm",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", default=None,
                    help="a model directory with config.json (default: the "
                         "default target, python -m vllm_jetspec.tools.assets)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.model is None:
        from .assets import default_model_dir
        args.model = str(default_model_dir())
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(cfg, sorted(set(args.rows)), args.iters)
    print(f"vLLM CPU GEMM (onednn_mm, fp32), {cfg['num_hidden_layers']} "
          f"layers + LM head of {args.model}, {torch.get_num_threads()} "
          "threads; ms per forward")
    print(f"{'rows':>5} {'layers':>9} {'LM head':>9} {'total':>9} "
          f"{'vs 1 row':>9}")
    for r in rows:
        vs = "" if r["vs_one_row"] is None else f"{r['vs_one_row']:.2f}"
        print(f"{r['rows']:>5} {r['layers_ms']:>9.2f} {r['lm_head_ms']:>9.2f} "
              f"{r['total_ms']:>9.2f} {vs:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, threads=torch.get_num_threads(),
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
