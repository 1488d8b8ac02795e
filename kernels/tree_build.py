"""One Triton launch for a draft pass's trees: ``tree.build_tree`` and its
packed ancestor mask, one program per request.

Same result as ``tree_build_ref.build_tree_rows_ref`` (the torch tree core,
in the V2 draft pass's row layout), ties included. In torch that is a sort
per depth, a global sort, a topological argsort, a dozen gathers and
scatters and the mask's pointer jumping: ≈ 80 small kernels a round, each
2-8 µs on an H200 even inside a CUDA graph (trace of 2026-12-03). Here a
program holds its request's rows in registers and in a small scratch
area and does the same steps in order:

1. each depth's K candidates sorted best first (stable, NaN as -inf);
2. per depth, the children of the frontier (frontier cum + candidate
   log-prob) sorted best first; the best ``m_d`` are the depth's
   candidates, the best ``n_beam`` of them the next frontier;
3. all candidates sorted best first (ties: shallower, then earlier), the
   best ``budget - 1`` finite ones kept, laid out by depth then rank
   (or by rank alone: ``layout="best_first"``);
4. parents as node indices, then each node's ancestor row by walking up
   the parents (``max_depth`` steps).

Sorting is ``tl.sort`` on int64 keys that pack an order-preserving image of
the float32 value (high word) with the entry's index (low word), which
makes the sort stable and gives the argsort for free. Steps that read
what other threads of the program wrote are separated by barriers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_jetspec.tree.build import (DEFAULT_BETA, DEFAULT_GAP0, LAYOUTS,
                                     beam_sizes,
                                     frontier_of, top2gap_fanout)

ALGOS = ("accum_logp", "top2gap_fanout", "topb_prefix", "chain")
# Above every real key (the image of NaN, which never occurs: NaN is -inf).
INT32_MAX: tl.constexpr = tl.constexpr(2147483647)


@triton.jit
def _desc_key(x):
    """float32 -> int32 whose ascending order is x's descending order
    (NaN taken as -inf, -0.0 as +0.0)."""
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    return ~(b ^ ((b >> 31) & 0x7FFFFFFF))


@triton.jit
def _key_value(k):
    """Inverse of ``_desc_key``."""
    s = ~k
    return (s ^ ((s >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _pack(hi, lo):
    return (hi.to(tl.int64) << 32) | lo.to(tl.int64)


@triton.jit
def _unpack(key):
    hi = (key >> 32).to(tl.int32)
    lo = (key - (hi.to(tl.int64) << 32)).to(tl.int32)
    return hi, lo


@triton.jit
def _tree_build_kernel(
    LOGP, IDS,
    S_LP, S_ID, C_CUM, C_PAR, C_TOK, C_DEP, NODE_OF,
    DRAFT, PARENTS, DEPTH, MASKS, NUM_NODES,
    budget,
    D: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, DP: tl.constexpr,
    N_SLOTS: tl.constexpr, N_DRAFT: tl.constexpr, N_BEAM: tl.constexpr,
    DLIM: tl.constexpr, CHAIN: tl.constexpr, BEST_FIRST: tl.constexpr,
    NBP: tl.constexpr,
    CP: tl.constexpr, BP: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    # 1. Each depth's candidates, best first; ties keep their order.
    d2 = tl.arange(0, DP)[:, None]
    k2 = tl.arange(0, KP)[None, :]
    ok = (d2 < D) & (k2 < K)
    lp = tl.load(LOGP + r * D * K + d2 * K + k2, mask=ok, other=0.0)
    key = tl.sort(_pack(tl.where(ok, _desc_key(lp), INT32_MAX), k2), dim=1)
    hi, k_s = _unpack(key)
    lp_s = tl.where(ok, _key_value(hi), float("-inf"))
    if CHAIN:
        lp_s = tl.where(k2 >= 1, float("-inf"), lp_s)
    tok_s = tl.load(IDS + r * D * K + d2 * K + k_s, mask=ok, other=-1)
    s_at = r * DP * KP + d2 * KP + k2
    tl.store(S_LP + s_at, lp_s)
    tl.store(S_ID + s_at, tok_s)
    tl.debug_barrier()

    # 2. Per depth: the frontier's children, best first.
    jj = tl.arange(0, NBP)[:, None]
    kk = tl.arange(0, KP)[None, :]
    pos = tl.arange(0, NBP * KP)
    crow = C_CUM + r * CP
    prev = 1
    off_prev = 0
    off = 0
    for d in range(DLIM):
        pc = tl.load(crow + off_prev + jj, mask=(jj < prev) & (d > 0),
                     other=float("-inf"))
        pc = tl.where((jj == 0) & (d == 0), 0.0, pc)
        c = pc + tl.load(S_LP + r * DP * KP + d * KP + kk)
        okc = (jj < prev) & (kk < K)
        ckey = _pack(tl.where(okc, _desc_key(c), INT32_MAX), jj * KP + kk)
        ckey = tl.sort(tl.reshape(ckey, [NBP * KP]))
        chi, idx = _unpack(ckey)
        m = tl.minimum(prev * K, N_DRAFT)
        st = pos < m
        j_s = idx // KP
        par = tl.where(d == 0, -1, off_prev + j_s)
        tok = tl.load(S_ID + r * DP * KP + d * KP + idx % KP, mask=st,
                      other=-1)
        tl.store(crow + off + pos, _key_value(chi), mask=st)
        tl.store(C_PAR + r * CP + off + pos, par, mask=st)
        tl.store(C_TOK + r * CP + off + pos, tok, mask=st)
        tl.store(C_DEP + r * CP + off + pos, d + 1 + 0 * pos, mask=st)
        tl.debug_barrier()
        off_prev = off
        off = off + m
        prev = tl.minimum(m, N_BEAM)

    # 3. All candidates best first; the best budget - 1 finite ones, by
    # depth then rank.
    col = tl.arange(0, CP)
    n_cand = off
    cum = tl.load(crow + col, mask=col < n_cand, other=float("-inf"))
    key = tl.sort(_pack(tl.where(col < n_cand, _desc_key(cum), INT32_MAX),
                        col))
    hi, sel = _unpack(key)
    n_sel = tl.minimum(n_cand, N_DRAFT)
    in_sel = col < n_sel
    keep = in_sel & (_key_value(hi) > float("-inf")) & (col < budget - 1)
    if BEST_FIRST:
        order = tl.where(keep, col, (DLIM + 2) * CP + col)
    else:
        dep = tl.load(C_DEP + r * CP + sel, mask=in_sel, other=0)
        order = tl.where(keep, dep * CP + col, (DLIM + 2) * CP + col)
    order = tl.where(in_sel, order, INT32_MAX)
    key = tl.sort(_pack(order, sel))
    order, sel = _unpack(key)
    kept = order < (DLIM + 1) * CP
    n_keep = tl.sum(kept.to(tl.int32), axis=0)
    tl.store(NODE_OF + r * CP + sel, col + 1, mask=kept)
    # Padding everywhere first (the root's parent and depth are padding's).
    slot = tl.arange(0, BP)
    zero = tl.zeros([BP], dtype=tl.int64)
    tl.store(DRAFT + r * (N_SLOTS - 1) + slot, zero, mask=slot < N_SLOTS - 1)
    tl.store(PARENTS + r * N_SLOTS + slot, zero - 1, mask=slot < N_SLOTS)
    tl.store(DEPTH + r * N_SLOTS + slot, zero, mask=slot < N_SLOTS)
    tl.debug_barrier()
    pg = tl.load(C_PAR + r * CP + sel, mask=kept, other=-1)
    pnode = tl.load(NODE_OF + r * CP + tl.maximum(pg, 0),
                    mask=kept & (pg >= 0), other=0)
    tok = tl.load(C_TOK + r * CP + sel, mask=kept, other=0)
    dep = tl.load(C_DEP + r * CP + sel, mask=kept, other=0)
    tl.store(DRAFT + r * (N_SLOTS - 1) + col, tok, mask=kept)
    tl.store(PARENTS + r * N_SLOTS + 1 + col, pnode.to(tl.int64), mask=kept)
    tl.store(DEPTH + r * N_SLOTS + 1 + col, dep.to(tl.int64), mask=kept)
    tl.store(NUM_NODES + r, (1 + n_keep).to(tl.int64))
    tl.debug_barrier()

    # 4. Ancestor rows: each node's bit and those of its ancestors.
    s = tl.arange(0, BP)[:, None]
    w = tl.arange(0, WP)[None, :]
    cur = tl.where(s < 1 + n_keep, s, -1)
    words = tl.zeros([BP, WP], dtype=tl.int64)
    one = tl.full([BP, WP], 1, dtype=tl.int64)
    for _ in range(DLIM + 1):
        c0 = tl.maximum(cur, 0)
        bit = one << (c0 % 64).to(tl.int64)
        words = words | tl.where((cur >= 0) & (w == c0 // 64), bit, 0)
        cur = tl.load(PARENTS + r * N_SLOTS + c0, mask=cur >= 0,
                      other=-1).to(tl.int32)
    tl.store(MASKS + r * N_SLOTS * W + s * W + w, words,
             mask=(s < N_SLOTS) & (w < W))


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(max(1, n)))


def plan(D: int, K: int, n_slots: int, algo: str,
         layout: str = "depth") -> dict:
    """The static sizes of a launch (the tree core's beam sizes, padded)."""
    n_beam, sizes = beam_sizes(D, K, n_slots, frontier_of(algo, K, n_slots))
    W = (n_slots + 63) // 64
    return dict(D=D, K=K, KP=_pow2(K), DP=_pow2(D), N_SLOTS=n_slots,
                N_DRAFT=n_slots - 1, N_BEAM=n_beam, DLIM=len(sizes),
                CHAIN=algo == "chain", BEST_FIRST=layout == "best_first",
                NBP=_pow2(n_beam),
                CP=_pow2(sum(sizes)), BP=_pow2(n_slots), W=W, WP=_pow2(W))


def build_tree_rows(logp: torch.Tensor, ids: torch.Tensor,
                    anchor: torch.Tensor | None, budget: int,
                    algo: str = "accum_logp", out=None,
                    beta: float | None = None, gap0: float | None = None,
                    layout: str = "depth"):
    """``build_tree_rows_ref`` in one launch (plus, for ``top2gap_fanout``,
    the fanout mask in torch first). ``logp`` [R, D, K] float, ``ids``
    [R, D, K] int64, ``anchor`` [R] or None (the root token: the draft rows
    hold nodes 1.., so the kernel never reads it; given, its shape is
    checked). ``out``: (draft [R, B-1], parents [R, B], depth
    [R, B], masks [R, B, W], num_nodes [R]) contiguous int64 rows to write
    (e.g. the first R rows of a draft pass's buffers), else new ones.
    ``layout``: the tree core's node order (``tree.LAYOUTS``).
    Scratch is allocated per call (inside a CUDA graph: the graph's
    pool)."""
    if algo not in ALGOS:
        raise ValueError(f"unknown tree algorithm {algo!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown tree layout {layout!r}")
    R, D, K = logp.shape
    if ids.shape != logp.shape or (anchor is not None
                                   and anchor.shape != (R,)):
        raise ValueError("logp and ids must be [R, D, K], anchor [R]")
    if not 1 <= budget <= 256:
        raise ValueError(f"tree budget must be in [1, 256], got {budget}")
    dev = logp.device
    logp = logp.float()
    if algo == "top2gap_fanout":
        logp = logp.masked_fill(torch.isnan(logp), -math.inf)
        logp, order = logp.sort(dim=-1, descending=True, stable=True)
        ids = ids.gather(-1, order)
        fan = top2gap_fanout(logp, DEFAULT_BETA if beta is None else beta,
                             DEFAULT_GAP0 if gap0 is None else gap0)
        logp = logp.masked_fill(
            torch.arange(K, device=dev) >= fan[..., None], -math.inf)
    p = plan(D, K, budget, algo, layout)
    B, W = budget, p["W"]
    if out is None:
        out = (torch.empty(R, B - 1, dtype=torch.long, device=dev),
               torch.empty(R, B, dtype=torch.long, device=dev),
               torch.empty(R, B, dtype=torch.long, device=dev),
               torch.empty(R, B, W, dtype=torch.long, device=dev),
               torch.empty(R, dtype=torch.long, device=dev))
    draft, parents, depth, masks, num_nodes = out
    for t, shape in zip(out, [(R, B - 1), (R, B), (R, B), (R, B, W), (R,)]):
        if tuple(t.shape) != shape or not t.is_contiguous() \
                or t.dtype != torch.long:
            raise ValueError(f"output {tuple(t.shape)} {t.dtype}: expected "
                             f"contiguous int64 {shape}")
    if R == 0:
        return out
    DP, KP, CP = p["DP"], p["KP"], p["CP"]
    s_lp = torch.empty(R, DP * KP, dtype=torch.float32, device=dev)
    s_id = torch.empty(R, DP * KP, dtype=torch.long, device=dev)
    c_cum = torch.empty(R, CP, dtype=torch.float32, device=dev)
    c_par = torch.empty(R, CP, dtype=torch.int32, device=dev)
    c_tok = torch.empty(R, CP, dtype=torch.long, device=dev)
    c_dep = torch.empty(R, CP, dtype=torch.int32, device=dev)
    node_of = torch.empty(R, CP, dtype=torch.int32, device=dev)
    _tree_build_kernel[(R,)](
        logp.contiguous(), ids.long().contiguous(),
        s_lp, s_id, c_cum, c_par, c_tok, c_dep, node_of,
        draft, parents, depth, masks, num_nodes, budget,
        num_warps=4 if max(CP, p["NBP"] * KP) <= 1024 else 8, **p)
    return out
