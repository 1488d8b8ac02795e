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


def paged_gather(cache: torch.Tensor, block_table: torch.Tensor, r: int,
                 length: int) -> torch.Tensor:
    """Rows 0..length-1 of request r from a paged cache
    [num_blocks, block_size, H, D] (a strided view is fine: only the rows
    needed are read)."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=block_table.device)
    return cache[block_table[r, pos // block_size].long(), pos % block_size]


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               prefix: int, mask_words: torch.Tensor | None, scale: float,
               causal: bool = True) -> torch.Tensor:
    """One request: q [n, Hq, D] for the last n of the L = prefix + n keys
    k/v [L, Hkv, D]. ``mask_words`` [n, W] packed rows give the pattern among
    the n new tokens (tree); None means causal (or full when not
    ``causal``). Every query sees the whole prefix. fp32 math; q's dtype."""
    n, Hq, _ = q.shape
    group = Hq // k.shape[1]
    kk = k.float().repeat_interleave(group, dim=1)
    vv = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kk) * scale
    if mask_words is not None:
        allowed = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device)
        allowed[:, prefix:] = _unpack_rows(mask_words, n)
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif causal:
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(prefix + n, device=q.device)[None, :]
        scores = scores.masked_fill(j > prefix + i, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).to(q.dtype)


def tree_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    tree_rows: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Attention output for every tree node of every request.

    Args:
        q: [T, Hq, D] queries, requests' nodes back to back.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D] paged K/V, the
            tree nodes' own K/V already written.
        block_table: [R, max_blocks] int page ids per request.
        prefix_lens: [R] cached tokens before each request's tree.
        query_start_loc: [R + 1] offsets of each request's nodes in ``q``.
        tree_mask: [R, N, W] int64 packed ancestor masks (``N`` >= nodes
            of every request with rows).
        scale: softmax scale.
        tree_rows: [R] flags, nonzero where a request's rows are in
            ``tree_mask``; a request with 0 is a chain: causal among its
            new tokens, or, not ``causal``, each sees all of them. None:
            every request has rows.

    Returns: [T, Hq, D] in ``q``'s dtype.
    """
    Hq, Hkv = q.shape[1], k_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads not a multiple of {Hkv} KV heads")
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    flags = [1] * len(qsl) if tree_rows is None else tree_rows.tolist()
    for r, p in enumerate(prefix_lens.tolist()):
        s, e = qsl[r], qsl[r + 1]
        if e == s:
            continue
        k = paged_gather(k_cache, block_table, r, p + e - s)
        v = paged_gather(v_cache, block_table, r, p + e - s)
        rows = tree_mask[r, :e - s] if flags[r] else None
        out[s:e] = attend_one(q[s:e], k, v, p, rows, scale, causal=causal)
    return out
