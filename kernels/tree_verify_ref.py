"""Torch reference for the row work of a V2 verify step (``tree_verify``).

A V2 runner's verify step lays a batch's trees out as one flat list of
``M`` rows: request ``r`` (batch row) owns rows ``cu[r]:cu[r + 1]``, its
scheduled nodes root first in the tree's node order, and row ``j`` is the
step's token ``li[j]`` (a request's rows are consecutive tokens). The
trees' shape is stored per request-state index ``idx[r]``: parents and
depths ``[max_reqs, budget]``, real nodes ``[max_reqs]``.

Before the target's forward, ``tree_positions_ref``: every row's position
``prefix + local`` becomes ``prefix + depth``.

After it, ``accept_rows_ref``, from the target's token at every row
(``tgt`` [M]): each request's deepest accepted path and bonus token
(``tree.accept``), the K/V moves that put the path at consecutive slots
(``tree.compaction_plan``, as cache slots), the node order with the path
first (``compaction.path_first_order``) and the gather over the step's
tokens that applies it (``tree.ragged.path_first_gather``) -- the tree
core's functions over the padded ``[R, N]`` layout, which is what the V2
verifier ran before the kernel (≈ 35 small kernels a step).
"""

from __future__ import annotations

import torch

from vllm_jetspec.tree import DraftTree, accept, compaction_plan
from vllm_jetspec.tree.ragged import (path_first_gather, position_offsets,
                                      ragged_rows, to_padded)


def tree_positions_ref(positions: torch.Tensor, li: torch.Tensor,
                       exp_idx: torch.Tensor, local: torch.Tensor,
                       req_depth: torch.Tensor) -> torch.Tensor:
    """Adds each row's ``depth - local`` to ``positions[li]`` in place;
    returns that offset [M] int64 (``exp_idx`` [M]: the row's request-state
    index, ``local`` [M]: its index in its request's rows)."""
    local = local.long()
    off = position_offsets(req_depth[exp_idx.long(), local], local)
    positions.index_add_(0, li.long(), off.to(positions.dtype))
    return off


def accept_rows_ref(cu, li, input_ids, tgt, slot_mapping, idx, req_parents,
                    req_depth, req_nodes, root_only, *, max_depth: int,
                    num_tokens: int):
    """The verify step's acceptance in the tree core's padded layout.

    ``cu`` [R + 1] row offsets; ``li`` [M] token of every row;
    ``input_ids``/``slot_mapping`` [>= num_tokens] the step's token ids and
    cache slots; ``tgt`` [M] the target's token at every row; ``idx`` [R]
    request-state index of every batch row; ``req_*`` the stored trees;
    ``root_only`` [max_reqs] bool by request-state index, or None (requests
    that keep their root only).

    Returns a dict: ``emitted`` [R, max_depth + 1] int64 (kept path's
    tokens and the bonus, -1 padded), ``num_sampled`` [R] int32 (accepted
    + 1), ``src``/``dst`` [R, max_depth + 1] int64 cache slots of the K/V
    moves (-1: none), ``perm`` [R, N] int64 (N = the most rows of a
    request: node order, kept path by depth first), ``reorder``
    [num_tokens] int64 (the step's tokens with each kept path first)."""
    R = cu.shape[0] - 1
    counts = (cu[1:] - cu[:-1]).long()
    M = li.shape[0]
    N = int(counts.max())
    rows = ragged_rows(counts, M)
    local = torch.arange(M, device=li.device) - cu.long()[rows]
    li = li.long()
    req = idx.long()
    nodes = torch.minimum(counts, req_nodes[req].long())
    if root_only is not None:
        nodes = torch.where(root_only[req], 1, nodes)
    tokens = to_padded(input_ids[li].long(), rows, local, R, N)
    target = to_padded(tgt.long(), rows, local, R, N)
    slots = to_padded(slot_mapping[li].long(), rows, local, R, N, fill=0)
    acc = accept(DraftTree(tokens, req_parents[req, :N].long(),
                           req_depth[req, :N].long(),
                           torch.zeros(R, N, device=li.device), nodes,
                           max_depth=max_depth), target)
    plan = compaction_plan(acc)
    moving = plan.src >= 0
    src = torch.where(moving, slots.gather(1, plan.src.clamp(min=0)), -1)
    dst = torch.where(moving, slots.gather(1, plan.dst.clamp(min=0)), -1)
    ar = torch.arange(N, device=li.device)
    on_path = torch.zeros(R, N + 1, dtype=torch.bool, device=li.device)
    on_path.scatter_(1, torch.where(acc.path_nodes >= 0, acc.path_nodes, N),
                     True)
    depth = req_depth[req, :N].long()
    perm = torch.where(on_path[:, :N], depth, N + ar).argsort(dim=1)
    return dict(emitted=acc.tokens,
                num_sampled=(acc.num_accepted + 1).to(torch.int32),
                src=src, dst=dst, perm=perm,
                reorder=path_first_gather(li, local, rows, perm,
                                          num_tokens))


def store_trees_ref(idx: torch.Tensor, rows, states) -> None:
    """``states[k][idx[r]] = rows[k][r]`` for each of the draft pass's tree
    buffers (parents, depths, masks, node counts), in place."""
    for src, dst in zip(rows, states):
        dst.index_copy_(0, idx.long(), src)


def tree_step_metadata_ref(masks, idx, seq_lens, qsl, masks_out, prefix_out,
                           qsl_out, tree_out) -> None:
    """What the Triton backend's metadata builder does in torch for a step
    in which every request verifies a tree (``tree_step_metadata``)."""
    R = qsl.shape[0] - 1
    n = idx.shape[0]
    torch.index_select(masks, 0, idx.long(), out=masks_out[:n])
    torch.clamp(seq_lens[:R] - (qsl[1:] - qsl[:-1]), min=0,
                out=prefix_out[:R])
    qsl_out[:R + 1].copy_(qsl)
    tree_out[:n] = 1
    tree_out[n:R] = 0


def chain_step_metadata_ref(qsl, seq_lens, prefix_out, qsl_out,
                            tree_out) -> None:
    """What the Triton backend's metadata builder does in torch for a step
    without trees (``chain_step_metadata``): prefixes clamped at 0, the
    query starts copied, every tree flag 0 (chains are computed in the
    attention kernel)."""
    R = qsl.shape[0] - 1
    torch.clamp(seq_lens[:R] - (qsl[1:] - qsl[:-1]), min=0,
                out=prefix_out[:R])
    qsl_out[:R + 1].copy_(qsl)
    tree_out[:R] = 0
