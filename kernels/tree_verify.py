"""The row work of a V2 verify step in two Triton launches.

Same results as ``tree_verify_ref`` (the tree core's functions over the
padded ``[R, N]`` layout; see there for the row layout). In torch the
verifier's work around the target's forward was ≈ 35 small launches a
step (the ragged -> padded copies, acceptance's pointer jumping, the
compaction plan, the path-first argsort and gather), each a few µs of
host time on a GPU host, in a round whose device work on a small target is
shorter than the host's (SmolLM2-135M: a round was 2.8 AR steps,
docs/design/async-rounds.md §4.3). Here:

- ``tree_positions``: one program per block of rows adds ``depth -
  local`` to each row's position (and takes it back after the step);
- ``accept_rows``: one program per request walks its tree from the root,
  at each depth to the child holding the target's token at the current
  node (siblings hold distinct tokens, so this is the tree core's chain of
  matching nodes; ``max_depth`` static steps, masked), then writes the
  emitted tokens, the accepted count, the K/V moves as cache slots (for
  ``kernels.kv_move``), the node order with the kept path first and that
  order's gather over the step's tokens.

Beside them, the small launches of the draft pass's store and of the tree
attention's metadata: ``store_trees``, ``tree_step_metadata`` (a step in
which every request verifies a tree) and ``chain_step_metadata`` (a step
without trees: prefill, plain decoding, the draft pass).

Nothing here waits for the device: every size is a Python int the runner
knows on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

POS_BLOCK = 128


# Sizes that change from step to step are not specialised on (Triton
# would compile a variant for 1 and for multiples of 16 mid-serving).
@triton.jit(do_not_specialize=["M", "B"])
def _tree_positions_kernel(POS, LI, EXP_IDX, LOCAL, DEP, OFF, M, B,
                           UNDO: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = j < M
    t = tl.load(LI + j, mask=m, other=0).to(tl.int64)
    if UNDO:
        off = tl.load(OFF + j, mask=m, other=0)
        sign = -1
    else:
        req = tl.load(EXP_IDX + j, mask=m, other=0).to(tl.int64)
        k = tl.load(LOCAL + j, mask=m, other=0).to(tl.int64)
        off = tl.load(DEP + req * B + k, mask=m, other=0).to(tl.int64) - k
        tl.store(OFF + j, off, mask=m)
        sign = 1
    p = tl.load(POS + t, mask=m, other=0)
    tl.store(POS + t, (p + sign * off).to(p.dtype), mask=m)


def tree_positions(positions: torch.Tensor, li: torch.Tensor,
                   exp_idx: torch.Tensor, local: torch.Tensor,
                   req_depth: torch.Tensor) -> torch.Tensor:
    """``tree_positions_ref`` in one launch: ``positions[li] += depth -
    local`` in place; returns the offsets [M] int64 (for
    ``untree_positions``)."""
    M = li.shape[0]
    off = torch.empty(M, dtype=torch.int64, device=li.device)
    if M:
        _tree_positions_kernel[(triton.cdiv(M, POS_BLOCK),)](
            positions, li, exp_idx, local, req_depth, off, M,
            req_depth.stride(0), UNDO=False, BLOCK=POS_BLOCK)
    return off


def untree_positions(positions: torch.Tensor, li: torch.Tensor,
                     off: torch.Tensor) -> None:
    """Takes ``tree_positions``' offsets back: ``positions[li] -= off``."""
    M = li.shape[0]
    if M:
        _tree_positions_kernel[(triton.cdiv(M, POS_BLOCK),)](
            positions, li, li, li, off, off, M, 0, UNDO=True,
            BLOCK=POS_BLOCK)


@triton.jit(do_not_specialize=["N", "B"])
def _accept_rows_kernel(
    CU, LI, IDS, TGT, SLOTS, IDX, PAR, NODES, ROOT_ONLY,
    EMIT, NSAMP, SRC, DST, PERM, REORDER,
    N, B,
    HAS_ROOT_ONLY: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
    LP: tl.constexpr,
):
    r = tl.program_id(0)
    start = tl.load(CU + r).to(tl.int64)
    n = tl.load(CU + r + 1).to(tl.int64) - start
    req = tl.load(IDX + r).to(tl.int64)
    nodes = tl.minimum(n, tl.load(NODES + req).to(tl.int64))
    if HAS_ROOT_ONLY:
        nodes = tl.where(tl.load(ROOT_ONLY + req) != 0, 1, nodes)
    k = tl.arange(0, BN)
    valid = k < nodes
    par = tl.load(PAR + req * B + k, mask=valid, other=-1).to(tl.int64)
    row_tok = tl.load(LI + start + k, mask=valid, other=0).to(tl.int64)
    tok = tl.load(IDS + row_tok, mask=valid, other=-1).to(tl.int64)

    # The walk: from the root, to the child holding the target's token at
    # the current node; stop where none does.
    d_idx = tl.arange(0, LP)
    path = tl.where(d_idx == 0, 0, -1).to(tl.int64)
    cur = start * 0
    acc = start * 0
    alive = nodes > 0
    for d in tl.static_range(1, D + 1):
        want = tl.load(TGT + start + cur).to(tl.int64)
        # (k > cur: a child comes after its parent in every layout, so the
        # path's nodes are distinct and below the request's node count even
        # should a stored tree ever be malformed, e.g. a root as its own
        # parent: its node order and gathers stay inside its rows)
        cand = valid & (par == cur) & (tok == want) & (k > cur)
        c = tl.min(tl.where(cand, k, BN), axis=0).to(tl.int64)
        go = alive & (c < BN)
        cur = tl.where(go, c, cur)
        acc = tl.where(go, d, acc)
        path = tl.where((d_idx == d) & go, c, path)
        alive = go

    # Emitted: the target's token along the path (= the path's drafts,
    # then the bonus); the accepted count.
    L = D + 1
    cols = d_idx < L
    on = d_idx <= acc
    pn = tl.where(on, path, 0)
    e = tl.load(TGT + start + pn, mask=on, other=-1).to(tl.int64)
    tl.store(EMIT + r * L + d_idx, tl.where(on, e, -1), mask=cols)
    tl.store(NSAMP + r, (acc + 1).to(tl.int32))

    # K/V moves: path node at depth d -> the slot of row d.
    mv = on & (path != d_idx)
    s = tl.load(SLOTS + tl.load(LI + start + pn, mask=mv, other=0),
                mask=mv, other=-1)
    t = tl.load(SLOTS + tl.load(LI + start + d_idx, mask=mv, other=0),
                mask=mv, other=-1)
    tl.store(SRC + r * L + d_idx, tl.where(mv, s, -1).to(tl.int64),
             mask=cols)
    tl.store(DST + r * L + d_idx, tl.where(mv, t, -1).to(tl.int64),
             mask=cols)

    # Node order: the path by depth, then the other nodes in their order;
    # perm[pos[k]] = k.
    eq = (path[:, None] == k[None, :]) & on[:, None]
    on_path = tl.max(eq.to(tl.int32), axis=0) > 0
    dk = tl.max(tl.where(eq, d_idx[:, None], -1), axis=0).to(tl.int64)
    off_path = (~on_path).to(tl.int64)
    before = tl.cumsum(off_path, axis=0) - off_path
    pos = tl.where(on_path, dk, acc + 1 + before)
    tl.store(PERM + r * N + pos, k.to(tl.int64), mask=k < N)
    # The gather over the step's tokens: row pos[k] takes row k's token.
    rows = k < n
    at = tl.load(LI + start + pos, mask=rows, other=0).to(tl.int64)
    tl.store(REORDER + at, at - pos + k, mask=rows)


def accept_rows(cu, li, input_ids, tgt, slot_mapping, idx, req_parents,
                req_nodes, root_only, *, max_depth: int, num_tokens: int,
                max_rows: int):
    """``accept_rows_ref`` in one launch (plus ``torch.arange`` for the
    gather's identity part), without the stored depths (a node's depth is
    the walk's step). ``max_rows``: the most rows of a request (``N``, the
    host's ``max(cu[r + 1] - cu[r])``). Same dict."""
    R = cu.shape[0] - 1
    dev = li.device
    L = max_depth + 1
    N = max_rows
    out = dict(
        emitted=torch.empty(R, L, dtype=torch.int64, device=dev),
        num_sampled=torch.empty(R, dtype=torch.int32, device=dev),
        src=torch.empty(R, L, dtype=torch.int64, device=dev),
        dst=torch.empty(R, L, dtype=torch.int64, device=dev),
        perm=torch.empty(R, N, dtype=torch.int64, device=dev),
        reorder=torch.arange(num_tokens, device=dev))
    if R == 0:
        return out
    if req_parents.stride(1) != 1:
        raise ValueError("stored trees must be row-contiguous")
    B = req_parents.shape[1]
    if N > B:
        raise ValueError(f"a request has {N} rows, its tree {B} nodes")
    _accept_rows_kernel[(R,)](
        cu, li, input_ids, tgt, slot_mapping, idx, req_parents, req_nodes,
        root_only if root_only is not None else idx,
        out["emitted"], out["num_sampled"], out["src"], out["dst"],
        out["perm"], out["reorder"], N, req_parents.stride(0),
        HAS_ROOT_ONLY=root_only is not None, D=max_depth,
        BN=triton.next_power_of_2(B), LP=triton.next_power_of_2(L),
        num_warps=4)
    return out


@triton.jit(do_not_specialize=["B", "BW"])
def _store_trees_kernel(IDX, SP, SD, SM, SN, DP, DD, DM, DN, B, BW,
                        BP: tl.constexpr, BM: tl.constexpr):
    r = tl.program_id(0)
    req = tl.load(IDX + r).to(tl.int64)
    j = tl.arange(0, BP)
    m = j < B
    tl.store(DP + req * B + j, tl.load(SP + r * B + j, mask=m), mask=m)
    tl.store(DD + req * B + j, tl.load(SD + r * B + j, mask=m), mask=m)
    w = tl.arange(0, BM)
    mw = w < BW
    tl.store(DM + req * BW + w, tl.load(SM + r * BW + w, mask=mw), mask=mw)
    tl.store(DN + req, tl.load(SN + r))


def store_trees(idx: torch.Tensor, rows, states) -> None:
    """A draft pass's trees from its batch rows to their request states in
    one launch: ``states[k][idx[r]] = rows[k][r]`` for (parents [R, B],
    depths [R, B], packed masks [R, B, W], node counts [R]) -- what four
    ``index_copy_`` did (``store_trees_ref``). Every tensor contiguous."""
    R = idx.shape[0]
    if R == 0:
        return
    if any(not t.is_contiguous() for t in (*rows, *states)):
        raise ValueError("tree buffers must be contiguous")
    B = rows[0].shape[1]
    BW = rows[2].shape[1] * rows[2].shape[2]
    _store_trees_kernel[(R,)](idx, *rows, *states, B, BW,
                              BP=triton.next_power_of_2(B),
                              BM=triton.next_power_of_2(BW), num_warps=1)


@triton.jit(do_not_specialize=["R", "NM", "NW"])
def _tree_step_metadata_kernel(MASKS, IDX, SEQ, QSL, MASKS_OUT, PREFIX_OUT,
                               QSL_OUT, TREE_OUT, R, NM, NW,
                               BM: tl.constexpr):
    r = tl.program_id(0)
    q0 = tl.load(QSL + r)
    tl.store(QSL_OUT + r, q0)
    if r == R - 1:
        tl.store(QSL_OUT + R, tl.load(QSL + R))
    q1 = tl.load(QSL + r + 1)
    tl.store(PREFIX_OUT + r,
             tl.maximum(tl.load(SEQ + r) - (q1 - q0), 0).to(
                 PREFIX_OUT.dtype.element_ty))
    tl.store(TREE_OUT + r, (r < NM).to(TREE_OUT.dtype.element_ty))
    if r < NM:
        req = tl.load(IDX + r).to(tl.int64)
        w = tl.arange(0, BM)
        m = w < NW
        tl.store(MASKS_OUT + r * NW + w,
                 tl.load(MASKS + req * NW + w, mask=m), mask=m)


def tree_step_metadata(masks: torch.Tensor, idx: torch.Tensor,
                       seq_lens: torch.Tensor, qsl: torch.Tensor,
                       masks_out: torch.Tensor, prefix_out: torch.Tensor,
                       qsl_out: torch.Tensor, tree_out: torch.Tensor) -> None:
    """The tree attention's metadata of a step in which every request
    verifies a tree, in one launch (``tree_step_metadata_ref``): each
    request's packed ancestor rows from its request state (``masks``
    [max_reqs, N, W], ``idx`` [n] for the step's n requests), and for
    the ``R = len(qsl) - 1 >= n`` rows of the step (a CUDA graph's padded
    requests included) the cached prefix ``max(seq_len - new tokens, 0)``,
    the query start locations and the tree flags (1 for the n requests, 0
    for padded rows), into the builder's persistent buffers (``masks_out``
    [>= n, N, W], ``prefix_out`` [>= R], ``qsl_out`` [>= R + 1],
    ``tree_out`` [>= R])."""
    R = qsl.shape[0] - 1
    if R <= 0:
        return
    if idx.shape[0] > R:
        raise ValueError(f"{idx.shape[0]} requests' masks for {R} rows")
    if not masks.is_contiguous() or not masks_out.is_contiguous() or \
            masks.shape[1:] != masks_out.shape[1:]:
        raise ValueError("masks must be contiguous and of one row shape")
    NW = masks.shape[1] * masks.shape[2]
    _tree_step_metadata_kernel[(R,)](
        masks, idx, seq_lens, qsl, masks_out, prefix_out, qsl_out, tree_out,
        R, idx.shape[0], NW, BM=triton.next_power_of_2(NW), num_warps=1)


@triton.jit(do_not_specialize=["R"])
def _chain_step_metadata_kernel(QSL, SEQ, PREFIX_OUT, QSL_OUT, TREE_OUT, R):
    r = tl.program_id(0)
    q0 = tl.load(QSL + r)
    q1 = tl.load(QSL + r + 1)
    tl.store(QSL_OUT + r, q0)
    if r == R - 1:
        tl.store(QSL_OUT + R, q1)
    tl.store(PREFIX_OUT + r, tl.maximum(tl.load(SEQ + r) - (q1 - q0), 0).to(
        PREFIX_OUT.dtype.element_ty))
    tl.store(TREE_OUT + r, tl.zeros([], TREE_OUT.dtype.element_ty))


def chain_step_metadata(qsl: torch.Tensor, seq_lens: torch.Tensor,
                        prefix_out: torch.Tensor, qsl_out: torch.Tensor,
                        tree_out: torch.Tensor) -> None:
    """The tree attention's metadata of a step without trees (a prefill or
    plain decoding step, a draft pass) in one launch
    (``chain_step_metadata_ref``): for each of the ``R = len(qsl) - 1``
    requests (a CUDA graph's padded ones included) the cached prefix
    ``max(seq_len - new tokens, 0)`` into ``prefix_out`` [>= R], the query
    starts into ``qsl_out`` [>= R + 1] and a 0 tree flag into ``tree_out``
    [>= R]: the kernel computes a chain's mask (causal, or every new token
    in a non-causal step), so no rows are written. What the torch
    reference (the builder's path off CUDA) does in five launches."""
    R = qsl.shape[0] - 1
    if R <= 0:
        return
    _chain_step_metadata_kernel[(R,)](qsl, seq_lens, prefix_out, qsl_out,
                                      tree_out, R, num_warps=1)


