"""Time the Triton tree-attention kernel against the bytes it must read.

    python -m vllm_jetspec.kernels.bench_tree_attention [--json out.json]

Qwen3-8B attention shape (32 query heads, 8 KV heads, head dim 128), bf16,
block size 16, scattered pages; per (batch, prefix, budget): kernel time
and achieved bandwidth = K/V bytes of the prefixes and trees / time (the
floor of a memory-bound kernel), and as a fraction of the bandwidth of a
1 GiB device-to-device copy measured in the same run; dot-product work as
TFLOP/s, against a bf16 matmul measured in the same run, and the fraction
of the roofline (the larger of the memory and compute floors). On CPU it
runs a tiny shape in Triton's interpreter (a smoke run, no timing claims).

Two times per row on CUDA. ``us``: device time, the median over replays of
a CUDA graph of back-to-back calls (``--graph-ms`` of them; Triton's
``do_bench_cudagraph``) per call -- what a verify step replaying a full
graph pays. ``us_eager``:
CUDA events around one eager call (median of repeats), which also holds the
host's launch of the kernel (Triton's launcher with its ~30 arguments):
what a piecewise-graph step pays per layer when the host is the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vllm_jetspec.kernels."
                                 "bench_tree_attention", description=__doc__,
                                 formatter_class=argparse.
                                 RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prefix", type=int, nargs="+",
                    default=[512, 4096, 8192])
    ap.add_argument("--budget", type=int, nargs="+", default=[16, 128, 256])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--splits", nargs="+", default=["1"],
                    help="prefix splits to time: integers and/or 'auto' "
                    "(one row each)")
    ap.add_argument("--tiles", nargs="+", default=["large"],
                    choices=["small", "large"],
                    help="program tiles to time: 'large' (the engine's "
                    "default: 64-row programs, 128-row ones for large trees) "
                    "and/or 'small' (64-row programs everywhere)")
    ap.add_argument("--tile", nargs="+", default=[], metavar="N:B:W:S",
                    help="explicit program tiles to time as well (tuning): "
                    "nodes per program : keys per step (16/32/64) : warps : "
                    "pipeline stages, e.g. 8:64:4:3")
    ap.add_argument("--max-prefix", type=int, default=None,
                    help="the bound of the prefixes that 'auto' splits are "
                    "chosen from (the engine passes the model's length, so "
                    "that a CUDA graph may replay the launch; default: each "
                    "row's prefix)")
    ap.add_argument("--split-blocks", type=int, default=None,
                    help="key blocks a prefix split takes at least "
                    "(default: the kernel's MIN_SPLIT_BLOCKS)")
    ap.add_argument("--graph-ms", type=float, default=20.0,
                    help="milliseconds of back-to-back calls per CUDA-graph "
                    "replay timed for 'us' (0: no graph timing)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None,
                    help="also plot device time and %% of copy bandwidth "
                    "against the budget, a line per (batch, prefix)")
    ap.add_argument("--plot-from", default=None, metavar="JSON",
                    help="no timing: redraw --png from an earlier --json")
    args = ap.parse_args(argv)
    if args.plot_from:
        if not args.png:
            ap.error("--plot-from needs --png")
        with open(args.plot_from) as f:
            print(plot(json.load(f), args.png))
        return
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .tree_attention import tree_attention

    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    hq, hkv, D, bs = (32, 8, 128, 16) if cuda else (4, 2, 32, 16)
    if not cuda:
        args.batch, args.prefix, args.budget, args.repeats = [1], [64], [8], 1
    splits = [x if x == "auto" else int(x) for x in args.splits]
    variants = [(tiles, sp) for tiles in args.tiles + args.tile
                for sp in splits]
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for B in args.batch:
        for P in args.prefix:
            for N in args.budget:
                L = P + N
                nblk = (L + bs - 1) // bs
                num_blocks = B * nblk
                perm = torch.randperm(num_blocks, generator=g)
                bt = perm.view(B, nblk).int().to(dev)
                k = torch.randn(num_blocks, bs, hkv, D, dtype=dtype,
                                device=dev)
                v = torch.randn_like(k)
                q = torch.randn(B * N, hq, D, dtype=dtype, device=dev)
                prefix = torch.full((B,), P, dtype=torch.int32, device=dev)
                qsl = (torch.arange(B + 1, device=dev) * N).int()
                # A chain-shaped mask (node i sees 0..i): the same work as
                # any tree of N nodes for this kernel.
                W = (N + 63) // 64
                mask = torch.zeros(N, W, dtype=torch.long)
                for i in range(N):
                    for w in range(W):
                        lo, hi = 64 * w, min(64 * w + 64, i + 1)
                        if hi > lo:
                            bits = (1 << (hi - lo)) - 1
                            mask[i, w] = bits - (1 << 64) if bits >= 1 << 63 \
                                else bits
                mask = mask.expand(B, N, W).contiguous().to(dev)
                # read as tree rows (the verify step's case)
                tree_rows = torch.ones(B, dtype=torch.int32, device=dev)
                first = None
                for tiles, sp in variants:
                    out = torch.empty_like(q)
                    call = lambda: tree_attention(  # noqa: E731
                        q, k, v, bt, prefix, qsl, mask, D ** -0.5,
                        max_nodes=N, out=out, num_splits=sp,
                        max_prefix=args.max_prefix or P,
                        tree_rows=tree_rows,
                        **({} if args.split_blocks is None else
                           dict(split_blocks=args.split_blocks)),
                        large_tiles=tiles == "large",
                        tile=None if tiles in ("small", "large") else
                        tuple(int(x) for x in tiles.split(":")))
                    call()
                    # Every variant against the first one timed (the
                    # kernel's tests check each against the reference).
                    diff = 0.0 if first is None else \
                        (out.float() - first).abs().max().item()
                    if first is None:
                        first = out.float().clone()
                    t_eager = time_eager(call, args.repeats, cuda)
                    t = t_eager
                    if cuda and args.graph_ms > 0:
                        t = time_graph(call, args.graph_ms)
                    nbytes = 2 * B * L * hkv * D * k.element_size() \
                        + 2 * q.numel() * q.element_size()
                    row = dict(batch=B, prefix=P, budget=N, tiles=tiles,
                               splits=sp,
                               us=round(t * 1e6, 1),
                               us_eager=round(t_eager * 1e6, 1),
                               timing="graph" if cuda and args.graph_ms
                               > 0 else "events" if cuda else "wall",
                               gbps=round(nbytes / t / 1e9, 1),
                               tflops=round(attention_flops(
                                   B, N, P, hq, D) / t / 1e12, 1),
                               max_diff_vs_first=diff)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    hbm = copy_bandwidth_gbps() if cuda else None
    mm = matmul_tflops(dtype=dtype) if cuda else None
    if hbm:
        add_roofline(rows, hbm, mm)
        print(json.dumps(dict(copy_gbps=round(hbm, 1),
                              matmul_tflops=round(mm, 1))), flush=True)
    info = dict(device=torch.cuda.get_device_name() if cuda else "cpu "
                "(Triton interpreter; no timing claim)", dtype=str(dtype),
                shape=dict(hq=hq, hkv=hkv, head_dim=D, block_size=bs),
                copy_gbps=hbm, matmul_tflops=mm, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    if args.png:
        print(plot(info, args.png))


def attention_flops(batch: int, budget: int, prefix: int, hq: int,
                    D: int) -> int:
    """Multiply-adds x 2 of a launch's two dot products (QK^T and PV) over
    every key a node's program visits: the whole prefix and the tree's
    slots (masked ones included, as the kernel computes them)."""
    return 4 * batch * budget * hq * D * (prefix + budget)


def add_roofline(rows: list[dict], copy_gbps: float,
                 matmul_tflops: float | None) -> None:
    """Per row: ``frac_of_copy`` (bandwidth / copy bandwidth) and, with a
    measured matmul rate, ``frac_of_matmul`` (tflops / matmul rate),
    ``bound`` (``memory`` when the K/V bytes at copy bandwidth take longer
    than the dot products at the matmul rate, else ``compute``) and
    ``frac_of_roofline`` (that larger floor / the kernel's time): how close
    the kernel is to what the device allows for this shape. Large trees are
    compute-bound: a bandwidth target cannot be met there."""
    for row in rows:
        row["frac_of_copy"] = round(row["gbps"] / copy_gbps, 3)
        if not matmul_tflops:
            continue
        t = row["us"] * 1e-6
        mem = row["gbps"] * 1e9 * t / (copy_gbps * 1e9)
        comp = row["tflops"] * 1e12 * t / (matmul_tflops * 1e12)
        row["frac_of_matmul"] = round(row["tflops"] / matmul_tflops, 3)
        row["bound"] = "memory" if mem >= comp else "compute"
        row["frac_of_roofline"] = round(max(mem, comp) / t, 3)


def matmul_tflops(n: int = 8192, repeats: int = 10, dtype=torch.bfloat16,
                  device: str = "cuda") -> float:
    """Measured dense matmul rate: an ``n x n x n`` product in ``dtype``
    (the compute ceiling the roofline uses): Triton's ``do_bench`` median
    on CUDA, the median of ``repeats`` wall times elsewhere."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    if device == "cuda":
        from triton.testing import do_bench
        t = do_bench(lambda: a @ b, return_mode="median") / 1e3
    else:
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
    return 2 * n ** 3 / t / 1e12


def plot(info: dict, path: str) -> str:
    """Device time (log scale) and fraction of the copy bandwidth against
    the budget, one line per (batch, prefix), for one variant: the default
    tiles without prefix splits when timed, else the first one. Returns
    ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = info["rows"]
    variants = [(r["tiles"], str(r["splits"])) for r in rows]
    pick = ("large", "1") if ("large", "1") in variants else variants[0]
    rows = [r for r in rows if (r["tiles"], str(r["splits"])) == pick]
    frac = all("frac_of_copy" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if frac else 1, figsize=(11 if frac else 6,
                                                           4.2), squeeze=False)
    keys = sorted({(r["batch"], r["prefix"]) for r in rows})
    for b, p in keys:
        line = sorted((r["budget"], r) for r in rows
                      if (r["batch"], r["prefix"]) == (b, p))
        x = [n for n, _ in line]
        axes[0][0].plot(x, [r["us"] for _, r in line], marker="o",
                        label=f"batch {b}, prefix {p}")
        if frac:
            axes[0][1].plot(x, [100 * r["frac_of_copy"] for _, r in line],
                            marker="o", label=f"batch {b}, prefix {p}")
    timing = rows[0].get("timing", "events") if rows else ""
    axes[0][0].set(xscale="log", yscale="log", xlabel="tree budget (nodes)",
                   ylabel=f"kernel time, us ({timing})")
    if frac:
        axes[0][1].set(xscale="log", xlabel="tree budget (nodes)",
                       ylabel="% of copy bandwidth", ylim=(0, 100))
        axes[0][1].axhline(60, color="grey", lw=0.8, ls="--")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"tree attention, {info.get('device', '')}, "
                 f"{info.get('dtype', '')}, tiles {pick[0]}, splits "
                 f"{pick[1]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def time_eager(call, repeats: int, cuda: bool) -> float:
    """Median seconds of one eager ``call``: CUDA events around it on a GPU
    (the host's launch included), wall time on CPU."""
    times = []
    for _ in range(repeats):
        if cuda:
            s, e = (torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True))
            s.record()
            call()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_graph(call, rep_ms: float) -> float:
    """Median device seconds of one ``call``, from CUDA-graph replays of
    back-to-back calls (Triton's ``do_bench_cudagraph``: as many calls as
    fit ``rep_ms``; no host launch inside the timed span)."""
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(call, rep=rep_ms, return_mode="median") / 1e3


def copy_bandwidth_gbps(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Measured HBM bandwidth: a device-to-device copy of ``nbytes``
    (read + write counted), median of ``repeats``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        s, e = (torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True))
        s.record()
        dst.copy_(src)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * nbytes / statistics.median(times) / 1e9


if __name__ == "__main__":
    main()
