"""Torch reference for tree attention over a paged KV cache.

The verify forward of a tree round: request ``r`` has ``prefix_lens[r]``
cached tokens and ``n_r`` tree nodes whose K/V were written to the next
``n_r`` slots of its pages (node ``i`` at sequence slot ``prefix + i``).
Node ``i`` attends to the whole prefix and to tree slot ``j`` iff bit ``j``
of its packed ancestor-mask row is set (itself and its ancestors).

This is the semantics the Triton kernel and the CPU attention backend must
reproduce; it loops over requests in Python and computes in fp32.
"""

from __future__ import annotations

import torch

BITS = 64


def _unpack_rows(words: torch.Tensor, n: int) -> torch.Tensor:
    """[n, W] int64 -> [n, n] bool."""
    shifts = torch.arange(BITS, device=words.device, dtype=torch.long)
    return ((words[..., None] >> shifts) & 1).flatten(-2)[..., :n].bool()


def paged_slots(block_table: torch.Tensor, r: int, length: int,
                block_size: int) -> torch.Tensor:
    """Flat cache slot of sequence positions 0..length-1 of request r."""
    pos = torch.arange(length, device=block_table.device)
    return block_table[r, pos // block_size].long() * block_size \
        + pos % block_size


def tree_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention output for every tree node of every request.

    Args:
        q: [T, Hq, D] queries, requests' nodes back to back.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D] paged K/V, the
            tree nodes' own K/V already written.
        block_table: [R, max_blocks] int page ids per request.
        prefix_lens: [R] cached tokens before each request's tree.
        query_start_loc: [R + 1] offsets of each request's nodes in ``q``.
        tree_mask: [R, N, W] int64 packed ancestor masks (``N`` >= nodes).
        scale: softmax scale.

    Returns: [T, Hq, D] in ``q``'s dtype.
    """
    T, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads not a multiple of {Hkv} KV heads")
    group = Hq // Hkv
    kf = k_cache.reshape(-1, Hkv, D)
    vf = v_cache.reshape(-1, Hkv, D)
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    for r, p in enumerate(prefix_lens.tolist()):
        s, e = qsl[r], qsl[r + 1]
        n = e - s
        if n == 0:
            continue
        slots = paged_slots(block_table, r, p + n, block_size)
        k = kf[slots].float().repeat_interleave(group, dim=1)   # [L, Hq, D]
        v = vf[slots].float().repeat_interleave(group, dim=1)
        allowed = torch.ones(n, p + n, dtype=torch.bool, device=q.device)
        allowed[:, p:] = _unpack_rows(tree_mask[r, :n], n)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1),
                                v).to(q.dtype)
    return out
