"""Time tree construction, verification masks and acceptance.

    python -m vllm_jetspec.tree.bench [--devices cpu cuda] [--algos ...]

Per (device, algorithm, batch, budget): milliseconds per call of
``build_tree``, ``packed_ancestor_mask`` and ``accept`` + ``compaction_plan``
(median over ``--iters`` after warm-up), on random draft top-K with the
shapes of a real round (depth 15, width 7 by default); on the CPU also
``packed_rows_host`` over the batch's trees ("host rows": what the runner
uses for steps of up to 256 nodes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .accept import accept, compaction_plan
from .build import TREE_ALGOS, build_tree
from .masks import BITS, packed_ancestor_mask, packed_rows_host


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_one(device: str, algo: str, batch: int, budget: int, depth: int,
              width: int, iters: int, vocab: int = 32000) -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, depth, 512, generator=g) * 2
    v, i = logits.log_softmax(-1).topk(width, dim=-1)
    v, i = v.to(device), (i * (vocab // 512)).to(device)
    anchor = torch.zeros(batch, dtype=torch.long, device=device)
    tree = build_tree(v, i, anchor, budget, algo=algo)
    # Targets that follow a random branch all the way down: the walk does
    # its full work.
    tgt = torch.randint(0, vocab, tree.tokens.shape, device=device)
    tgt.scatter_(1, tree.parents.clamp(min=0), tree.tokens.clamp(min=0))
    build_ms = _time(lambda: build_tree(v, i, anchor, budget, algo=algo),
                     device, iters)
    mask_ms = _time(lambda: packed_ancestor_mask(tree), device, iters)
    accept_ms = _time(lambda: compaction_plan(accept(tree, tgt)), device,
                      iters)
    host_rows_ms = None
    if device == "cpu":
        W = (budget + BITS - 1) // BITS
        par = [tree.parents[r, :int(tree.num_nodes[r])] for r in range(batch)]
        host_rows_ms = _time(lambda: [packed_rows_host(p.tolist(), W)
                                      for p in par], device, iters)
    return dict(device=device, algo=algo, batch=batch, budget=budget,
                depth=depth, width=width, build_ms=build_ms,
                mask_ms=mask_ms, host_rows_ms=host_rows_ms,
                accept_ms=accept_ms,
                total_ms=build_ms + mask_ms + accept_ms)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(
        prog="python -m vllm_jetspec.tree.bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", nargs="+", default=None,
                    help="default: cpu, and cuda when present")
    ap.add_argument("--algos", nargs="+", default=["accum_logp",
                                                   "topb_prefix"],
                    choices=TREE_ALGOS)
    ap.add_argument("--batch-sizes", nargs="+", type=int,
                    default=[1, 8, 32])
    ap.add_argument("--budgets", nargs="+", type=int,
                    default=[16, 64, 128, 256])
    ap.add_argument("--depth", type=int, default=15)
    ap.add_argument("--width", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if
                                          torch.cuda.is_available() else []))
    rows = []
    hdr = (f"{'device':<6} {'algo':<14} {'batch':>5} {'budget':>6} "
           f"{'build ms':>9} {'mask ms':>8} {'host rows':>9} "
           f"{'accept ms':>9} {'total ms':>9}")
    print(hdr)
    print("-" * len(hdr))
    for dev in devices:
        for algo in args.algos:
            for b in args.batch_sizes:
                for n in args.budgets:
                    r = bench_one(dev, algo, b, n, args.depth, args.width,
                                  args.iters)
                    rows.append(r)
                    print(f"{dev:<6} {algo:<14} {b:>5} {n:>6} "
                          f"{r['build_ms']:>9.3f} {r['mask_ms']:>8.3f} "
                          + (f"{r['host_rows_ms']:>9.3f} "
                             if r['host_rows_ms'] is not None
                             else f"{'-':>9} ") +
                          f"{r['accept_ms']:>9.3f} {r['total_ms']:>9.3f}",
                          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=
                           torch.get_num_threads(), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
