"""After acceptance: the kept path's K/V moved to consecutive cache slots,
and the node order that puts each kept path first (for the next draft
pass's context). Shared by the V1 hooks (``runner.py``) and the V2 verifier
(``v2/verifier.py``); tensor ops only, no wait for the device, so both run
inside one CUDA graph per shape with the acceptance."""

from __future__ import annotations

import torch

from ..tree import Acceptance, compaction_plan


def move_kept_kv(kv_caches, acc: Acceptance, slots: torch.Tensor,
                 table=None) -> None:
    """Move each request's kept K/V to consecutive slots after its prefix
    in every layer of ``kv_caches`` (our backends' layout ``[blocks, 2,
    block_size, H, D]``). ``slots`` [R, N] int64: the cache slot each node
    was written to (only the kept path's and the root's are read).
    ``table``: the same caches as a ``kernels.kv_move.KVTable`` (CUDA):
    one Triton launch for every layer; without it one gather and one
    scatter per layer for the batch."""
    plan = compaction_plan(acc)               # [R, L] node offsets, -1: stays
    moving = plan.src >= 0
    if table is not None:
        from ..kernels.kv_move import move_kv_slots
        move_kv_slots(
            table,
            torch.where(moving, slots.gather(1, plan.src.clamp(min=0)), -1),
            torch.where(moving, slots.gather(1, plan.dst.clamp(min=0)), -1))
        return
    # A slot nothing else touches for the moves that do nothing: the root's
    # (it never moves and no move writes it), copied onto itself.
    root = slots[:, :1]
    src = torch.where(moving, slots.gather(1, plan.src.clamp(min=0)),
                      root).flatten()
    dst = torch.where(moving, slots.gather(1, plan.dst.clamp(min=0)),
                      root).flatten()
    bs = None
    for kv in kv_caches:
        if kv.shape[2] != bs:
            bs = kv.shape[2]
            sb, so, db, do = src // bs, src % bs, dst // bs, dst % bs
        kv[db, :, do] = kv[sb, :, so]


def path_first_order(acc: Acceptance, depth: torch.Tensor) -> torch.Tensor:
    """[R, N] node order: each request's kept path by depth, then its other
    nodes in their order (``depth`` [R, N], the trees' node depths)."""
    R, N = depth.shape
    ar = torch.arange(N, device=depth.device)
    on_path = torch.zeros(R, N + 1, dtype=torch.bool, device=depth.device)
    on_path.scatter_(1, torch.where(acc.path_nodes >= 0, acc.path_nodes, N),
                     True)
    return torch.where(on_path[:, :N], depth, N + ar).argsort(dim=1)
