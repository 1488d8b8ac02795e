"""Compiles the V2 round's small kernels (``tree_verify.py``) for a CUDA
architecture without a GPU: ``python -m vllm_jetspec.kernels.compile_check``.

Triton's interpreter (how the tests run these kernels on CPU) executes
what a compiled kernel may refuse -- type promotions across loop
iterations, reductions over some dtypes -- so a machine without a GPU
still compiles every variant the V2 runner launches (the dtypes it passes,
the constexprs of each budget and depth) to a cubin with Triton's own
toolchain, and prints registers and spills where ``cuobjdump`` says them.
Exit status 1 if any variant fails. Needs ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

# Argument types as the V2 verifier, speculator and attention builder pass
# them (vLLM's int32 index tensors, int64 positions, slots and trees).
POS = dict(POS="*i64", LI="*i64", EXP_IDX="*i32", LOCAL="*i32", DEP="*i64",
           OFF="*i64", M="i32", B="i32", UNDO="constexpr", BLOCK="constexpr")
ACCEPT = dict(CU="*i32", LI="*i64", IDS="*i32", TGT="*i64", SLOTS="*i64",
              IDX="*i32", PAR="*i64", NODES="*i64", ROOT_ONLY="*i1",
              EMIT="*i64", NSAMP="*i32", SRC="*i64", DST="*i64",
              PERM="*i64", REORDER="*i64", N="i32", B="i32",
              HAS_ROOT_ONLY="constexpr", D="constexpr", BN="constexpr",
              LP="constexpr")
STORE = dict(IDX="*i32", SP="*i64", SD="*i64", SM="*i64", SN="*i64",
             DP="*i64", DD="*i64", DM="*i64", DN="*i64", B="i32", BW="i32",
             BP="constexpr", BM="constexpr")
META = dict(MASKS="*i64", IDX="*i32", SEQ="*i32", QSL="*i32",
            MASKS_OUT="*i64", PREFIX_OUT="*i32", QSL_OUT="*i32",
            TREE_OUT="*i32", R="i32", NM="i32", NW="i32", BM="constexpr")
CHAIN = dict(QSL="*i32", SEQ="*i32", PREFIX_OUT="*i32", QSL_OUT="*i32",
             TREE_OUT="*i32", R="i32")


def variants(budgets, depths):
    """(name, kernel, signature, constexprs, num_warps) of every variant."""
    import triton

    from . import tree_verify as tv
    p2 = triton.next_power_of_2
    out = [("positions", tv._tree_positions_kernel, POS,
            dict(UNDO=False, BLOCK=tv.POS_BLOCK), 4),
           ("positions_undo", tv._tree_positions_kernel,
            dict(POS, EXP_IDX="*i64", LOCAL="*i64"),
            dict(UNDO=True, BLOCK=tv.POS_BLOCK), 4),
           # one variant for every step without trees, whatever its shape
           ("chain_metadata", tv._chain_step_metadata_kernel, CHAIN, {},
            1)]
    for B in budgets:
        W = (B + 63) // 64
        for D in depths:
            out.append((f"accept_b{B}_d{D}", tv._accept_rows_kernel, ACCEPT,
                        dict(HAS_ROOT_ONLY=True, D=D, BN=p2(B),
                             LP=p2(D + 1)), 4))
        out.append((f"store_b{B}", tv._store_trees_kernel, STORE,
                    dict(BP=p2(B), BM=p2(B * W)), 1))
        out.append((f"metadata_b{B}", tv._tree_step_metadata_kernel, META,
                    dict(BM=p2(B * W)), 1))
    return out


# The tree-attention kernels (compiled to check how they address the K/V
# caches).
ATTN_PTRS = dict(Q="*bf16", K="*fp16", V="*fp16", O="*bf16", BT="*i32",
                 PREFIX="*i32", QSL="*i32", MASK="*i64", TREE="*i32", MW="*fp32",
                 LW="*fp32", AW="*fp32")


def attention_variants():
    """(name, kernel, signature, constexprs, num_warps) of the tree
    attention's launches (the small tile, bf16 queries, fp16 caches)."""
    from . import tree_attention as ta

    consts = dict(BLOCK_SIZE=16, GROUP=4, NODES=16, ROWS=64, D=128,
                  BLOCK_N=64, PREC="ieee")
    out = []
    for name, fn in (("attention_single", ta._tree_attn_kernel),
                     ("attention_split", ta._tree_attn_split_kernel)):
        sig = {a: "constexpr" if a in consts else ATTN_PTRS.get(
            a, "fp32" if a == "scale" else "i32") for a in fn.arg_names}
        out.append((name, fn, sig, {k: v for k, v in consts.items()
                                    if k in sig}, 4))
    return out


def narrow_page_ids(ttir: str) -> list[str]:
    """Page ids read from the block table (tensor loads of int32) that are
    used without being widened to int64 first. A page id times the cache's
    block stride passes 2^31 once one layer's cache holds 2^31 elements (4
    GiB of bf16), so each must be widened before that product (vLLM's own
    Triton attention does the same). Empty when every one is."""
    loads = re.findall(r"(%[\w.]+) = tt\.load [^\n]*tensor<[^>]*!tt\.ptr<i32>>",
                       ttir)
    bad = []
    for name in loads:
        uses = [line.strip() for line in ttir.splitlines()
                if re.search(re.escape(name) + r"\b", line)
                and not line.strip().startswith(name + " ")]
        if not uses or any(not re.match(r"%[\w.]+ = arith\.extsi "
                                        + re.escape(name) + r"\b.*to "
                                        r"tensor<[^>]*xi64>", u)
                           for u in uses):
            bad.append(name)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vllm_jetspec.kernels.compile_check",
        description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90,
                    help="CUDA compute capability (90: H100/H200)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--depths", type=int, nargs="+", default=[7, 15, 31])
    ap.add_argument("--attention", action="store_true",
                    help="the tree-attention kernels instead, each checked "
                         "for page ids widened to 64 bits")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 is set: compiled kernels need it unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__),
                             "backends", "nvidia", "bin", "cuobjdump")
    failed = 0
    todo = attention_variants() if args.attention else \
        variants(args.budgets, args.depths)
    for name, fn, sig, consts, warps in todo:
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig,
                                         constexprs=consts),
                               target=target, options={"num_warps": warps})
        except Exception as e:  # noqa: BLE001 -- reported, counted
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
            continue
        narrow = narrow_page_ids(k.asm["ttir"]) if args.attention else []
        if narrow:
            failed += 1
            print(f"FAIL {name}: page ids used as int32 (K/V offsets can "
                  f"pass 2^31): {', '.join(narrow)}")
            continue
        res = ""
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                out = subprocess.run([cuobjdump, "-res-usage", f.name],
                                     capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
            if m:
                res = f" registers {m.group(1)}, local (spill) bytes " \
                      f"{m.group(2)}"
        print(f"ok   {name}: cubin {len(k.asm['cubin'])} bytes{res}")
    print(f"sm_{args.arch}: {failed} of the variants failed" if failed
          else f"sm_{args.arch}: every variant compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
