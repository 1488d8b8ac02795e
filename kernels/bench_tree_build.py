"""Device time of a draft pass's tree build: the fused kernel
(``tree_build.build_tree_rows``) against the torch tree core
(``tree_build_ref.build_tree_rows_ref``), each replayed in a CUDA graph
(what the V2 draft pass pays), on the draft pass's shapes: per-depth
top-K log-probs [R, depth, width] of a softmax over a vocabulary, every
algorithm, budgets and batch sizes from the command line. Checks that both
give the same rows first.

    python -m vllm_jetspec.kernels.bench_tree_build --batch 1 8 32 \\
        --budget 16 128 --json OUT.json

Needs a GPU (the graphs); ``--eager`` times plain calls instead (any device).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from .tree_build import ALGOS, build_tree_rows
from .tree_build_ref import build_tree_rows_ref


def inputs(R: int, D: int, K: int, vocab: int, dev, seed: int = 0):
    g = torch.Generator(device=dev).manual_seed(seed)
    logits = torch.randn(R * D, vocab, generator=g, device=dev) * 3
    v, i = logits.topk(K, dim=-1)
    v = v - logits.logsumexp(-1, keepdim=True)
    anchor = torch.randint(0, vocab, (R,), generator=g, device=dev)
    return v.view(R, D, K), i.view(R, D, K), anchor


def time_call(call, cuda: bool, eager: bool, repeats: int = 50) -> float:
    """Median microseconds of one call."""
    if cuda and not eager:
        from triton.testing import do_bench_cudagraph
        return do_bench_cudagraph(call, rep=20, return_mode="median") * 1e3
    ts = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--budget", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS),
                    choices=ALGOS)
    ap.add_argument("--depth", type=int, default=15)
    ap.add_argument("--width", type=int, default=7)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    rows = []
    for algo in args.algos:
        for B in args.budget:
            for R in args.batch:
                v, i, a = inputs(R, args.depth, args.width, args.vocab, dev)
                same = all(torch.equal(x, y) for x, y in zip(
                    build_tree_rows(v, i, a, B, algo),
                    build_tree_rows_ref(v, i, a, B, algo)))
                row = dict(algo=algo, budget=B, batch=R, same=same)
                for name, fn in (("kernel", build_tree_rows),
                                 ("torch", build_tree_rows_ref)):
                    row[f"{name}_us"] = round(time_call(
                        lambda fn=fn: fn(v, i, a, B, algo), cuda,
                        args.eager), 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    info = dict(device=torch.cuda.get_device_name() if cuda else "cpu",
                date=datetime.date.today().isoformat(),
                timing="eager" if args.eager or not cuda else "cuda graph",
                depth=args.depth, width=args.width, vocab=args.vocab,
                rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
