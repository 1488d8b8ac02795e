"""Torch reference for moving K/V rows between slots of a paged cache.

After a tree round, each request's kept path moves to consecutive slots
after its prefix (``vllm_patches.compaction``). Request ``r``'s moves are
``src[r, i] -> dst[r, i]`` (cache slots, ``block * block_size + offset``;
-1: no move); every read of a request happens before any of its writes, and
requests touch disjoint slots. Caches have the layout ``[blocks, 2,
block_size, H, D]`` (K and V), one per layer, all moved alike.
"""

from __future__ import annotations

import torch


def move_kv_slots_ref(kv_caches: list[torch.Tensor], src: torch.Tensor,
                      dst: torch.Tensor) -> None:
    """In place; loops in Python (tests only)."""
    for kv in kv_caches:
        bs = kv.shape[2]
        for r in range(src.shape[0]):
            pairs = [(int(s), int(d)) for s, d in zip(src[r], dst[r])
                     if int(s) >= 0]
            rows = [kv[s // bs, :, s % bs].clone() for s, _ in pairs]
            for (_, d), row in zip(pairs, rows):
                kv[d // bs, :, d % bs] = row
