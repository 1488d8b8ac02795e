"""Verification inputs: positions and the tree-causal (ancestor) mask.

In the verify forward every node attends to the whole cached prefix and to
itself and its ancestors inside the tree; its position is
``prefix_len + depth``. The mask comes in two forms:

- dense ``[R, N, N]`` bool, ``mask[r, i, j]`` = node ``j`` is node ``i`` or
  one of its ancestors (what a reference implementation reads);
- packed ``[R, N, W]`` int64 with ``W = ceil(N / 64)``: bit ``j % 64`` of
  word ``j // 64`` of row ``i`` is ``mask[r, i, j]`` (what a kernel reads).
"""

from __future__ import annotations

import torch

from .types import DraftTree

BITS = 64


def positions(tree: DraftTree, prefix_len: torch.Tensor) -> torch.Tensor:
    """[R, N] int64 positions of the nodes (padding: the root's position).

    ``prefix_len`` [R] is the number of tokens before the anchor, i.e. the
    anchor's own position."""
    return prefix_len.long()[:, None] + tree.depth.clamp(min=0)


def ancestor_mask(tree: DraftTree) -> torch.Tensor:
    """[R, N, N] bool: row ``i`` marks node ``i`` and its ancestors.
    Padding rows and columns are all False. ``max_depth`` gather steps."""
    R, N = tree.tokens.shape
    dev = tree.device
    valid = tree.valid()
    mask = torch.zeros(R, N, N + 1, dtype=torch.bool, device=dev)
    cur = torch.where(valid, torch.arange(N, device=dev).expand(R, N), N)
    rows = torch.ones(R, N, 1, dtype=torch.bool, device=dev)
    parents = torch.cat([tree.parents, torch.full((R, 1), -1,
                        dtype=torch.long, device=dev)], 1)
    for _ in range(tree.max_depth + 1):
        mask.scatter_(2, cur[:, :, None], rows)
        nxt = parents.gather(1, cur)
        cur = torch.where(nxt < 0, N, nxt)
    return mask[:, :, :N]


def pack_mask(dense: torch.Tensor) -> torch.Tensor:
    """[..., N] bool -> [..., ceil(N/64)] int64 bit words."""
    *lead, n = dense.shape
    words = (n + BITS - 1) // BITS
    padded = torch.zeros(*lead, words * BITS, dtype=torch.long,
                         device=dense.device)
    padded[..., :n] = dense.long()
    shifts = torch.arange(BITS, device=dense.device, dtype=torch.long)
    # Distinct bits never carry, so the sum is their OR (bit 63 wraps to the
    # sign bit as intended).
    return (padded.view(*lead, words, BITS) << shifts).sum(-1)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_mask``: [..., W] int64 -> [..., n] bool."""
    shifts = torch.arange(BITS, device=packed.device, dtype=torch.long)
    bits = (packed[..., None] >> shifts) & 1
    return bits.flatten(-2)[..., :n].bool()


def packed_ancestor_mask(tree: DraftTree) -> torch.Tensor:
    """[R, N, ceil(N/64)] int64 packed form of ``ancestor_mask``, built
    directly in words (O(log(max_depth) * N * W), no N x N) by pointer
    jumping: after step k a node's row holds its own bit and those of its
    2^k - 1 nearest ancestors, and ``anc`` is its 2^k-th ancestor (the
    root is its own parent, so rows stop growing there); padding rows are
    cleared at the end. A few kernels per step, ceil(log2(max_depth + 1))
    steps: the draft pass builds this on the device every round."""
    R, N = tree.tokens.shape
    W = (N + BITS - 1) // BITS
    dev = tree.device
    ar = torch.arange(N, device=dev)
    valid = tree.valid()
    words = torch.zeros(R, N, W, dtype=torch.long, device=dev)
    bit = torch.ones((), dtype=torch.long, device=dev) << (ar % BITS)
    words.scatter_(2, (ar // BITS).expand(R, N)[:, :, None],
                   torch.where(valid, bit, 0)[:, :, None])
    anc = tree.parents.clamp(min=0)
    for _ in range(max(1, (tree.max_depth).bit_length())):
        words = words | words.gather(1, anc[:, :, None].expand(R, N, W))
        anc = anc.gather(1, anc)
    return torch.where(valid[:, :, None], words, 0)


def packed_rows_host(parents: list[int], words: int) -> torch.Tensor | None:
    """[n, words] int64 packed ancestor rows of one tree from its parent
    list on the host (node ``i``'s parent ``parents[i]``, the root's -1),
    built with Python integers: a row is its parent's row plus its own bit,
    one pass over the nodes. Equal to ``packed_ancestor_mask`` of the tree
    (rows of valid nodes) at a fraction of its host time for one tree (no
    tensor op per depth level); None when a parent does not come before
    its child (then use ``packed_ancestor_mask``)."""
    n = len(parents)
    if n > words * BITS:
        raise ValueError(f"{n} nodes do not fit {words} words")
    rows = [0] * n
    for i, p in enumerate(parents):
        if p >= i:
            return None
        rows[i] = (rows[p] if p >= 0 else 0) | (1 << i)
    low, sign = (1 << BITS) - 1, 1 << (BITS - 1)
    flat = []
    for r in rows:
        for w in range(words):
            v = (r >> (BITS * w)) & low
            flat.append(v - (1 << BITS) if v & sign else v)
    return torch.tensor(flat, dtype=torch.long).view(n, words)
