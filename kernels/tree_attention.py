"""Triton paged tree attention for the verify forward of a tree round.

Same semantics and arguments as ``tree_attention_ref`` (the torch reference
beside this file): request ``r`` has ``prefix_lens[r]`` cached tokens and
``n_r`` tree nodes whose K/V sit in the next ``n_r`` slots of its pages;
node ``i`` attends to the whole prefix and to tree slot ``j`` iff bit ``j``
of its packed ancestor-mask row is set. A request whose ``tree_rows`` flag
is 0 has no mask rows: its new tokens are a chain (slot ``j`` iff ``j <=
i``, or every slot in a non-causal step), computed, never read -- so a
prefill chunk of thousands of tokens needs no ``chunk x chunk`` bits.

One program per (request, tile of nodes, KV head). The query heads that
share a KV head (GQA) are packed into the rows of the tile, so every K/V
tile is read once per group; scores and the online softmax are fp32. The
caches may be strided views (e.g. ``kv[:, 0]`` of a ``[blocks, 2,
block_size, H, D]`` cache). Under ``TRITON_INTERPRET=1`` the kernel runs on
CPU tensors (how the tests check it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_queries(
    Q, q0, n, node0, kvh, s_qt, s_qh, s_qd,
    GROUP: tl.constexpr, NODES: tl.constexpr, ROWS: tl.constexpr,
    D: tl.constexpr,
):
    """A program's rows: the query heads of KV head kvh (GQA group) of tree
    nodes node0 .. node0 + NODES - 1; returns node, head, row_ok, q."""
    rows = tl.arange(0, ROWS)
    node = node0 + rows // GROUP                       # tree node of a row
    head = kvh * GROUP + rows % GROUP                  # its query head
    row_ok = (rows < NODES * GROUP) & (node < n)
    d = tl.arange(0, D)
    q = tl.load(Q + (q0 + node)[:, None] * s_qt + head[:, None] * s_qh
                + d[None, :] * s_qd, mask=row_ok[:, None], other=0.0)
    return node, head, row_ok, q


@triton.jit
def _attend(
    q, K, V, BT, MASK, r, kvh, node, row_ok, prefix, n, lo, hi, last,
    is_tree, later, qk_scale,
    s_kb, s_ks, s_kh, s_kd,
    s_vb, s_vs, s_vh, s_vd,
    s_btr, s_btb,
    s_mr, s_mn, s_mw,
    ROWS: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """Online softmax of one program's rows (q: [ROWS, D]) over prefix keys
    [lo, hi) and tree slots [0, last) of request r, KV head kvh (its mask
    rows when ``is_tree``, else a chain: causal, or every slot when
    ``later``); returns the unnormalised (running max m in base 2, sum l,
    acc)."""
    d = tl.arange(0, D)
    cols = tl.arange(0, BLOCK_N)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)

    # The prefix: every node sees all of it.
    for start in range(lo, hi, BLOCK_N):
        pos = start + cols
        ok = pos < hi
        page = tl.load(BT + r * s_btr + (pos // BLOCK_SIZE) * s_btb,
                       mask=ok, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k = tl.load(K + page[None, :] * s_kb + slot[None, :] * s_ks
                    + kvh * s_kh + d[:, None] * s_kd,
                    mask=ok[None, :], other=0.0)       # [D, BLOCK_N]
        s = tl.dot(q, k.to(q.dtype), out_dtype=tl.float32,
                   input_precision=PREC) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + page[:, None] * s_vb + slot[:, None] * s_vs
                    + kvh * s_vh + d[None, :] * s_vd,
                    mask=ok[:, None], other=0.0)       # [BLOCK_N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v,
                                            out_dtype=tl.float32,
                                            input_precision=PREC)
        m_i = m_new

    # The tree: slot j of the tree iff bit j of the node's mask row is set;
    # a chain: j <= node (causal) or every slot (``later``), no mask read.
    for start in range(0, last, BLOCK_N):
        t = start + cols
        ok = t < n
        word = tl.load(MASK + r * s_mr + node * s_mn + (start // 64) * s_mw,
                       mask=row_ok & is_tree, other=0)  # [ROWS] int64
        bit = (word[:, None] >> (t % 64)[None, :].to(tl.int64)) & 1
        chain = (t[None, :] <= node[:, None]) | (later != 0)
        allowed = tl.where(is_tree, bit != 0, chain) & ok[None, :] \
            & row_ok[:, None]
        pos = prefix + t
        page = tl.load(BT + r * s_btr + (pos // BLOCK_SIZE) * s_btb,
                       mask=ok, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k = tl.load(K + page[None, :] * s_kb + slot[None, :] * s_ks
                    + kvh * s_kh + d[:, None] * s_kd,
                    mask=ok[None, :], other=0.0)
        s = tl.dot(q, k.to(q.dtype), out_dtype=tl.float32,
                   input_precision=PREC) * qk_scale
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing allowed so far keep m = -inf: avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + page[:, None] * s_vb + slot[:, None] * s_vs
                    + kvh * s_vh + d[None, :] * s_vd,
                    mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v,
                                            out_dtype=tl.float32,
                                            input_precision=PREC)
        m_i = m_new
    return m_i, l_i, acc


# Arguments whose values may change from step to step (the engine's masks
# keep one shape since chains are computed, but tools and tests pass masks
# of each step's shape; ``later`` follows the step's causality) are not
# specialised: Triton would
# otherwise compile a new variant for each divisibility class (== 1,
# multiple of 16, other) of each stride, and a compilation inside a served
# step costs seconds (H100, 2026-11-24: a 5 s verify step in the first
# prefill of a SmolLM2 run, reported by vLLM's JIT monitor).
_PER_STEP = ["s_mr", "s_mn", "s_mw", "later"]
# Each kernel's arguments left unspecialised (read by the test that checks
# ``precompile`` against the launches).
DO_NOT_SPECIALIZE = {
    "_tree_attn_kernel": _PER_STEP,
    "_tree_attn_split_kernel": ["min_split", "T", "HQ", "SPLITS"] + _PER_STEP,
    "_tree_attn_combine_kernel": ["T", "HQ", "SPLITS"],
}


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["_tree_attn_kernel"])
def _tree_attn_kernel(
    Q, K, V, O, BT, PREFIX, QSL, MASK, TREE,
    scale, later,
    s_qt, s_qh, s_qd,
    s_kb, s_ks, s_kh, s_kd,
    s_vb, s_vs, s_vh, s_vd,
    s_ot, s_oh, s_od,
    s_btr, s_btb,
    s_mr, s_mn, s_mw,
    BLOCK_SIZE: tl.constexpr,     # tokens per KV page
    GROUP: tl.constexpr,          # query heads per KV head
    NODES: tl.constexpr,          # tree nodes per program
    ROWS: tl.constexpr,           # next power of two >= NODES * GROUP
    D: tl.constexpr,              # head dim (power of two)
    BLOCK_N: tl.constexpr,        # keys per step; divides 64
    PREC: tl.constexpr,           # tl.dot input precision
):
    r = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)
    q0 = tl.load(QSL + r)
    n = tl.load(QSL + r + 1) - q0
    node0 = tile * NODES
    if node0 >= n:
        return
    prefix = tl.load(PREFIX + r)

    node, head, row_ok, q = _tile_queries(
        Q, q0, n, node0, kvh, s_qt, s_qh, s_qd, GROUP=GROUP, NODES=NODES,
        ROWS=ROWS, D=D)
    d = tl.arange(0, D)

    # The whole prefix, then the tree slots up to the tile's last node
    # (no later slot can be an ancestor), or all of them (``later``: a
    # non-causal step, where a node may see later slots).
    m_i, l_i, acc = _attend(
        q, K, V, BT, MASK, r, kvh, node, row_ok, prefix, n, 0, prefix,
        tl.where(later != 0, n, tl.minimum(node0 + NODES, n)),
        tl.load(TREE + r) != 0, later, scale * 1.4426950408889634,
        s_kb, s_ks, s_kh, s_kd, s_vb, s_vs, s_vh, s_vd, s_btr, s_btb,
        s_mr, s_mn, s_mw, ROWS=ROWS, D=D, BLOCK_SIZE=BLOCK_SIZE,
        BLOCK_N=BLOCK_N, PREC=PREC)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]   # 0: masked rows
    tl.store(O + (q0 + node)[:, None] * s_ot + head[:, None] * s_oh
             + d[None, :] * s_od, out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["_tree_attn_split_kernel"])
def _tree_attn_split_kernel(
    Q, K, V, MW, LW, AW, BT, PREFIX, QSL, MASK, TREE,
    scale, later, min_split, T, HQ,
    s_qt, s_qh, s_qd,
    s_kb, s_ks, s_kh, s_kd,
    s_vb, s_vs, s_vh, s_vd,
    s_btr, s_btb,
    s_mr, s_mn, s_mw,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, NODES: tl.constexpr,
    ROWS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, SPLITS,
):
    """``_tree_attn_kernel`` with the prefix split across programs
    (flash-decoding): program (r, tile, kvh * SPLITS + s) covers prefix keys
    [s * L, (s + 1) * L) of request r and, for the last split, the tree;
    it writes its unnormalised partial (running max m, sum l, acc) to the
    fp32 workspaces MW/LW [SPLITS, T, HQ] and AW [SPLITS, T, HQ, D], which
    ``_tree_attn_combine_kernel`` merges.

    L is the request's own: its prefix over SPLITS, rounded up to whole key
    blocks and at least ``min_split`` keys, so nothing the host reads from
    the device sizes the launch (a CUDA graph replays it whatever the
    prefixes); splits past a short prefix find no keys and write only
    m = -inf (the combine then reads nothing else of them)."""
    r = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2) // SPLITS
    sp = tl.program_id(2) % SPLITS
    q0 = tl.load(QSL + r)
    n = tl.load(QSL + r + 1) - q0
    node0 = tile * NODES
    if node0 >= n:
        return
    prefix = tl.load(PREFIX + r)

    split_len = tl.maximum(
        tl.cdiv(tl.cdiv(prefix, SPLITS), BLOCK_N) * BLOCK_N, min_split)
    lo = sp * split_len
    hi = tl.minimum(lo + split_len, prefix)     # SPLITS * L >= prefix
    # The last split alone takes the tree (as far as the single pass).
    last = tl.where(sp == SPLITS - 1, tl.where(
        later != 0, n, tl.minimum(node0 + NODES, n)), 0)
    rows = tl.arange(0, ROWS)
    # int64: SPLITS * T * HQ * D can pass 2^31.
    w = (sp * T + q0 + node0 + rows // GROUP).to(tl.int64) * HQ \
        + kvh * GROUP + rows % GROUP                       # [ROWS]
    if (lo >= hi) & (last == 0):
        # No key here (a split past a short prefix): m = -inf only, which
        # the combine reads as "nothing to add".
        row_ok = (rows < NODES * GROUP) & (node0 + rows // GROUP < n)
        tl.store(MW + w, tl.full([ROWS], float("-inf"), tl.float32),
                 mask=row_ok)
        return

    node, head, row_ok, q = _tile_queries(
        Q, q0, n, node0, kvh, s_qt, s_qh, s_qd, GROUP=GROUP, NODES=NODES,
        ROWS=ROWS, D=D)
    d = tl.arange(0, D)
    m_i, l_i, acc = _attend(
        q, K, V, BT, MASK, r, kvh, node, row_ok, prefix, n, lo, hi, last,
        tl.load(TREE + r) != 0, later, scale * 1.4426950408889634,
        s_kb, s_ks, s_kh, s_kd, s_vb, s_vs, s_vh, s_vd, s_btr, s_btb,
        s_mr, s_mn, s_mw, ROWS=ROWS, D=D, BLOCK_SIZE=BLOCK_SIZE,
        BLOCK_N=BLOCK_N, PREC=PREC)
    tl.store(MW + w, m_i, mask=row_ok)
    tl.store(LW + w, l_i, mask=row_ok)
    tl.store(AW + w[:, None] * D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["_tree_attn_combine_kernel"])
def _tree_attn_combine_kernel(
    MW, LW, AW, O, T, HQ, s_ot, s_oh, s_od, SPLITS,
    D: tl.constexpr,
):
    """out[t, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the
    splits of one (query token, head); 0 where no key was allowed. Splits
    with m = -inf (no key: empty splits write nothing else) are not read.
    (Split 0 starts each sum, so loop-carried values keep one type.)"""
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    row0 = t.to(tl.int64) * HQ + h          # int64, as in the split kernel
    big = tl.load(MW + row0)
    for sp in range(1, SPLITS):
        big = tl.maximum(big, tl.load(MW + (sp * T + t).to(tl.int64) * HQ
                                      + h))
    safe = tl.where(big == float("-inf"), 0.0, big)
    m = tl.load(MW + row0)
    some = m > float("-inf")
    wgt = tl.where(some, tl.exp2(m - safe), 0.0)
    den = wgt * tl.load(LW + row0, mask=some, other=0.0)
    zero = tl.zeros([D], tl.int32)
    acc = wgt * tl.load(AW + row0 * D + d, mask=(zero + some.to(tl.int32)) != 0,
                        other=0.0)
    for sp in range(1, SPLITS):
        row = (sp * T + t).to(tl.int64) * HQ + h
        m = tl.load(MW + row)
        some = m > float("-inf")
        wgt = tl.where(some, tl.exp2(m - safe), 0.0)
        den = den + wgt * tl.load(LW + row, mask=some, other=0.0)
        acc = acc + wgt * tl.load(AW + row * D + d,
                                  mask=(zero + some.to(tl.int32)) != 0,
                                  other=0.0)
    out = acc / tl.where(den == 0.0, 1.0, den)
    tl.store(O + t * s_ot + h * s_oh + d * s_od, out.to(O.dtype.element_ty))


WORKSPACE_BYTES = 256 << 20     # at most this much fp32 split workspace


LARGE_ROWS = 128    # rows of a program for large trees and prefills
SMALL_ROWS = 64     # rows of a program otherwise


def tile_config(max_nodes: int, group: int, D: int,
                large: bool = True) -> tuple[int, int, int, int]:
    """(nodes per program, rows = nodes x group padded to a power of two
    >= 16, keys per step, warps) for a launch whose largest request has
    ``max_nodes`` new tokens.

    Every node tile reads its request's whole prefix, so small tiles on a
    large tree re-read the prefix many times. Launches with at least
    ``LARGE_ROWS`` rows of work per KV head (large trees, prefills) take
    tiles of 128 rows (32 nodes of a GQA group of 4) with 8 warps, the rest
    (decode steps, small trees) tiles of 64 rows (16 nodes of a group of 4,
    i.e. a whole budget-16 tree) with 4 warps; 64 keys a step for both.
    H100, 2026-11-24 (device time, Qwen3-8B attention shape, bf16): against
    the former 32-row tiles with 32 keys a step, 64 rows cut a budget-16
    step by 20-30 % (batch 8, prefix 768: 25.6 vs 32.8 us) and 128 rows a
    budget-128 one by 2-2.6x (batch 8, prefix 4096: 291 vs 747 us).
    ``large=False`` keeps the 64-row tile for every launch. Head dims above
    128 take half the rows and keys (register room for the fp32 output
    accumulator), untimed.
    Two variants per (head dim, group, dtype) only: each distinct value is
    a separate Triton compilation, and compilations must not land in timed
    rounds (on the H100 a per-tree-size tile cost a 157 ms verify step)."""
    wide = D > 128
    big, small = (LARGE_ROWS // 2, SMALL_ROWS // 2) if wide else \
        (LARGE_ROWS, SMALL_ROWS)
    keys = 32 if wide else 64
    if large and max_nodes * group >= big:
        nodes = max(1, big // group)
        return (nodes, max(16, triton.next_power_of_2(nodes * group)), keys,
                8)
    nodes = max(1, small // group)
    return (nodes, max(16, triton.next_power_of_2(nodes * group)), keys, 4)


# Keys a split takes at least, in key blocks: each split's partial (fp32,
# rows x head dim) costs about what one block of bf16 K and V does to read.
MIN_SPLIT_BLOCKS = 2


def choose_splits(programs: int, max_prefix: int, block_n: int,
                  num_sms: int, min_blocks: int = MIN_SPLIT_BLOCKS) -> int:
    """Prefix splits so that about two programs run per SM, with room for
    ``min_blocks`` key blocks per split in a prefix of ``max_prefix``; 1
    when the grid is already full. ``max_prefix`` may be a bound (e.g. the
    model's length, under CUDA graphs): each request's splits divide its
    own prefix, and those past it cost a program that returns at once."""
    if programs >= 2 * num_sms:
        return 1
    want = -(-2 * num_sms // max(programs, 1))
    return max(1, min(want, max_prefix // (min_blocks * block_n)))


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    max_nodes: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | str = 1,
    max_prefix: int | None = None,
    large_tiles: bool = True,
    tile: tuple[int, int, int, int] | None = None,
    precision: str | None = None,
    split_blocks: int = MIN_SPLIT_BLOCKS,
    causal: bool = True,
    tree_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of ``tree_attention_ref`` (same arguments).

    ``tree_rows`` [>= R] int32: nonzero for a request whose new tokens
    have rows in ``tree_mask``; 0 for a chain, whose rows are computed
    (``tree_mask`` is then never read for it, so it need not hold them:
    a long prefill chunk beside trees needs no rows of its length). None:
    every request has rows (allocates a flag tensor: tests and tools; the
    engine passes its builder's buffer).

    ``causal``: the mask rows are ancestors (or causal chains), so no
    node sees a later slot and each program reads the tree's slots up to
    its own last node; False (a non-causal step: every new token of a
    request for each of them) reads all of them.

    ``max_nodes`` bounds the nodes of any request (default: read from
    ``query_start_loc``, which synchronises with the device); ``out`` may be
    given to write in place. ``num_splits``: how many programs share each
    request's prefix (flash-decoding, with a combine pass through fp32
    workspaces; each request's prefix divided in equal whole key blocks of
    at least ``split_blocks``, on the device); ``"auto"`` picks it from
    the grid size, the SM count and ``max_prefix`` (an upper bound of
    ``prefix_lens``: the model's length makes a launch that a CUDA graph
    may replay for any prefixes; read from the device when not given). 1 is
    the single-pass kernel. ``large_tiles``: 128-row
    programs for large trees and prefills (``tile_config``; False: 64-row
    programs for every launch). ``precision`` of the fp32 dot products
    (``tl.dot`` input precision): ``"ieee"`` (the default for fp32 inputs)
    or ``"tf32"`` (what vLLM's own Triton attention uses for fp32; ~1e-3
    relative error); bf16/fp16 inputs ignore it.
    ``tile``: (nodes per program, keys per step, warps, pipeline stages),
    overriding ``tile_config`` (for tuning runs; keys per step must divide
    64). Returns ``[T, Hq, D]`` in ``q``'s dtype.
    """
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads not a multiple of {Hkv} KV heads")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim {D}: a power of two >= 16 is supported")
    group = Hq // Hkv
    R = prefix_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if max_nodes is None:
        max_nodes = int((query_start_loc[1:] - query_start_loc[:-1]).max()) \
            if R else 0
    if T == 0 or max_nodes == 0:
        return out
    if tree_rows is None:
        tree_rows = torch.ones(R, dtype=torch.int32, device=q.device)
    elif tree_rows.shape[0] < R or tree_rows.device != q.device:
        # the kernel reads one flag per request, unmasked
        raise ValueError(f"tree_rows: {R} flags on {q.device} needed, got "
                         f"{tuple(tree_rows.shape)} on {tree_rows.device}")
    stages = {}
    if tile is not None:
        nodes, block_n, warps, st = (int(x) for x in tile)
        if nodes < 1 or block_n < 16 or 64 % block_n or warps < 1 or st < 1:
            raise ValueError(f"tile {tile}: nodes >= 1, keys per step 16, "
                             "32 or 64, warps and stages >= 1")
        rows = max(16, triton.next_power_of_2(nodes * group))
        stages = dict(num_stages=st)
    else:
        nodes, rows, block_n, warps = tile_config(max_nodes, group, D,
                                                  large=large_tiles)
    tiles = triton.cdiv(max_nodes, nodes)
    prec = _precision(q, precision)
    splits = num_splits
    if splits == "auto":
        if max_prefix is None:
            max_prefix = int(prefix_lens.max()) if R else 0
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count \
            if q.is_cuda else 8
        splits = choose_splits(R * tiles * Hkv, max_prefix, block_n, sms,
                               split_blocks)
    splits = int(splits)
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1 or 'auto', got {splits}")
    if splits > 1:
        if max_prefix is None:
            max_prefix = int(prefix_lens.max()) if R else 0
        # No more splits than key blocks, and a bounded fp32 workspace
        # (a given count applies to every call, long prefills included).
        splits = min(splits, max(1, triton.cdiv(max_prefix, block_n)),
                     max(1, WORKSPACE_BYTES // (T * Hq * (D + 2) * 4)))
    if splits > 1:
        ws = _workspaces(splits, T, Hq, D, q.device)
        _launch_split(q, k_cache, v_cache, ws, block_table, prefix_lens,
                      query_start_loc, tree_mask, tree_rows, scale,
                      split_blocks * block_n, (nodes, rows, block_n, warps),
                      prec, splits, (R, tiles, Hkv * splits), stages,
                      later=int(not causal))
        _launch_combine(ws, out, splits, (T, Hq))
        return out
    _launch_single(q, k_cache, v_cache, out, block_table, prefix_lens,
                   query_start_loc, tree_mask, tree_rows, scale,
                   (nodes, rows, block_n, warps), prec, (R, tiles, Hkv),
                   stages, later=int(not causal))
    return out


def _precision(q: torch.Tensor, precision: str | None) -> str:
    """``tl.dot``'s input precision for ``q``'s dtype: ``precision`` (IEEE
    by default) for fp32, TF32 (ignored by the dot) for bf16/fp16."""
    if precision not in (None, "ieee", "tf32"):
        raise ValueError(f"precision {precision!r}: 'ieee' or 'tf32'")
    return (precision or "ieee") if q.dtype == torch.float32 else "tf32"


# The launches, shared by ``tree_attention`` and ``precompile`` (a
# precompiled variant must be the launch's own: same arguments, so the same
# Triton specialisation). ``warmup``: compile without launching.
def _go(kernel, grid, args, kwargs, warmup):
    if warmup:
        return kernel.warmup(*args, grid=grid, **kwargs)
    return kernel[grid](*args, **kwargs)


def _workspaces(splits, T, Hq, D, device):
    mw = torch.empty(splits, T, Hq, dtype=torch.float32, device=device)
    return mw, torch.empty_like(mw), torch.empty(
        splits, T, Hq, D, dtype=torch.float32, device=device)


def _launch_single(q, k_cache, v_cache, out, block_table, prefix_lens,
                   query_start_loc, tree_mask, tree_rows, scale, tile, prec,
                   grid, stages, warmup=False, later=0):
    nodes, rows, block_n, warps = tile
    Hq, D = q.shape[1:]
    return _go(_tree_attn_kernel, grid, (
        q, k_cache, v_cache, out, block_table, prefix_lens,
        query_start_loc, tree_mask, tree_rows, scale, later,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        *block_table.stride(), *tree_mask.stride()), dict(
        BLOCK_SIZE=k_cache.shape[1], GROUP=Hq // k_cache.shape[2],
        NODES=nodes, ROWS=rows, D=D, BLOCK_N=block_n, PREC=prec,
        num_warps=warps, **stages), warmup)


def _launch_split(q, k_cache, v_cache, ws, block_table, prefix_lens,
                  query_start_loc, tree_mask, tree_rows, scale, min_split,
                  tile, prec, splits, grid, stages, warmup=False, later=0):
    nodes, rows, block_n, warps = tile
    T, Hq, D = q.shape
    return _go(_tree_attn_split_kernel, grid, (
        q, k_cache, v_cache, *ws, block_table, prefix_lens,
        query_start_loc, tree_mask, tree_rows, scale, later, min_split, T,
        Hq,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *block_table.stride(), *tree_mask.stride()), dict(
        BLOCK_SIZE=k_cache.shape[1], GROUP=Hq // k_cache.shape[2],
        NODES=nodes, ROWS=rows, D=D, BLOCK_N=block_n, PREC=prec,
        SPLITS=splits, num_warps=warps, **stages), warmup)


def _launch_combine(ws, out, splits, grid, warmup=False):
    T, Hq, D = out.shape
    return _go(_tree_attn_combine_kernel, grid,
               (*ws, out, T, Hq, *out.stride(), splits), dict(D=D), warmup)


def tile_variants(group: int, D: int,
                  large: bool = True) -> list[tuple[int, int, int, int]]:
    """Every tile ``tile_config`` may return for a head layout: the small
    one, and the large one when ``large``."""
    out = [tile_config(1, group, D, large=False)]
    if large:
        big = tile_config(1 << 30, group, D, large=True)
        if big not in out:
            out.append(big)
    return out


def precompile(q: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, block_table: torch.Tensor,
               prefix_lens: torch.Tensor, query_start_loc: torch.Tensor,
               tree_mask: torch.Tensor, scale: float,
               out: torch.Tensor | None = None, num_splits: int | str = 1,
               large_tiles: bool = True,
               precision: str | None = None,
               tree_rows: torch.Tensor | None = None) -> int:
    """Compile, without launching (Triton's ``warmup``), every kernel
    variant that ``tree_attention`` may launch on tensors laid out as
    these (the same arguments, whatever the step: tiles small and large,
    single pass and split, the combine pass): each variant is its own
    Triton compilation, and one inside a served step is a latency spike
    (vLLM's JIT monitor warns of it, or fails the step with
    ``--jit-monitor-mode=error``). vLLM's start-up warm-up prefills
    ``1 + drafts`` tokens per request, so before this the large tile was
    first compiled by the first real prompt (H200, 2026-12-05). Returns the
    number of variants looked up (compiled, or found in Triton's cache)."""
    T, Hq, D = q.shape
    if out is None:
        out = torch.empty_like(q)
    if tree_rows is None:
        tree_rows = torch.ones(prefix_lens.shape[0], dtype=torch.int32,
                               device=q.device)
    prec = _precision(q, precision)
    splits = num_splits == "auto" or int(num_splits) > 1
    ws = _workspaces(2, 1, Hq, D, q.device) if splits else None
    n = 0
    for tile in tile_variants(Hq // k_cache.shape[2], D, large=large_tiles):
        _launch_single(q, k_cache, v_cache, out, block_table, prefix_lens,
                       query_start_loc, tree_mask, tree_rows, scale, tile,
                       prec, (1, 1, 1), {}, warmup=True)
        n += 1
        if splits:
            _launch_split(q, k_cache, v_cache, ws, block_table,
                          prefix_lens, query_start_loc, tree_mask,
                          tree_rows, scale, MIN_SPLIT_BLOCKS * tile[2],
                          tile, prec, 2,
                          (1, 1, 1), {}, warmup=True)
            n += 1
    if splits:
        _launch_combine(ws, out, 2, (1, 1), warmup=True)
        n += 1
    return n
