"""Acceptance: the deepest tree path the target itself would have produced.

The verify forward gives the target's distribution at every node (the
next-token distribution after the node's path). Acceptance needs one target
token per node:

- greedy: the argmax at every node;
- sampling: one independent draw at every node from the target's processed
  distribution (``sampling.sample_target_tokens``).

Then, starting at the root, move to the child holding the target's token at
the current node, and stop where no child does; the target's token at the
stop node is the bonus token. Every emitted token is the target's own token
at its context: with argmax that is greedy decoding, with draws it is
sampling. The draws at nodes the walk never visits are never used, and each
visited draw is independent of the draft, so every emitted token has exactly
the target's distribution given what precedes it (JetSpec's rule; lossless
for any draft). Drawing at every node in advance keeps the walk free of
data-dependent control flow: ``log2(max_depth)`` pointer-jumping steps and
one scatter on the device.
"""

from __future__ import annotations

import torch

from .types import PAD, Acceptance, CompactionPlan, DraftTree


def accept(tree: DraftTree, target_tokens: torch.Tensor) -> Acceptance:
    """Accept the deepest node whose path agrees with ``target_tokens``.

    Args:
        tree: the verified trees.
        target_tokens: [R, N] int64, the target's token at every node (argmax
            or a draw); padding slots are ignored.
    """
    R, N = tree.tokens.shape
    if target_tokens.shape != (R, N):
        raise ValueError(f"target_tokens must be {(R, N)}, "
                         f"got {tuple(target_tokens.shape)}")
    dev = tree.device
    valid = tree.valid()
    target_tokens = target_tokens.long()
    par = tree.parents.clamp(min=0)
    # A node matches when its token is the target's token at its parent.
    match = (tree.tokens == target_tokens.gather(1, par)) & valid
    match[:, 0] = True
    # ok[i]: the whole path to i matches, by pointer jumping: after step k,
    # ok[i] covers i and its 2^k - 1 nearest ancestors and anc[i] is its
    # 2^k-th ancestor (the root is its own parent, and matches), so
    # ceil(log2(max_depth + 1)) steps cover every path (a few launches
    # instead of one pair per depth).
    ok, anc = match, par
    for _ in range(max(1, (tree.max_depth).bit_length())):
        ok = ok & ok.gather(1, anc)
        anc = anc.gather(1, anc)
    # Siblings hold distinct tokens, so the ok nodes form one chain from
    # the root (at most one per depth): the kept path is the ok nodes by
    # depth, and its deepest node the last.
    score = torch.where(ok, tree.depth, -1)
    last = score.argmax(dim=1)                                  # [R]
    num_acc = tree.depth.gather(1, last[:, None]).squeeze(1)    # [R]

    L = tree.max_depth + 1
    path = torch.full((R, L + 1), PAD, dtype=torch.long, device=dev)
    nodes = torch.arange(N, device=dev).expand(R, N)
    path.scatter_(1, torch.where(ok, tree.depth, L), nodes)
    path = path[:, :L]

    ar = torch.arange(L, device=dev)
    # Emitted: the path's draft tokens (depth 1..a), then the bonus token.
    nxt = path[:, 1:]
    drafted = tree.tokens.gather(1, nxt.clamp(min=0))
    tokens = torch.full((R, L), PAD, dtype=torch.long, device=dev)
    tokens[:, :L - 1] = torch.where(nxt >= 0, drafted, PAD)
    bonus = target_tokens.gather(1, last[:, None])
    tokens.scatter_(1, num_acc[:, None], bonus)
    tokens = torch.where(ar[None, :] <= num_acc[:, None], tokens, PAD)
    return Acceptance(num_accepted=num_acc, tokens=tokens, path_nodes=path,
                      last_node=last)


def accept_greedy(tree: DraftTree, target_logits: torch.Tensor) -> Acceptance:
    """Greedy acceptance from the target's logits ``[R, N, V]``."""
    return accept(tree, target_logits.argmax(dim=-1))


def compaction_plan(acc: Acceptance) -> CompactionPlan:
    """Which KV slots (offsets from the anchor's slot) move where so that the
    kept path occupies ``0..num_accepted`` consecutively. Nodes already in
    place (e.g. the root, or a path along the first-ranked branch) do not
    move."""
    L = acc.path_nodes.shape[1]
    ar = torch.arange(L, device=acc.path_nodes.device).expand_as(
        acc.path_nodes)
    moves = (acc.path_nodes >= 0) & (acc.path_nodes != ar)
    return CompactionPlan(src=torch.where(moves, acc.path_nodes, PAD),
                          dst=torch.where(moves, ar, PAD),
                          num_kept=acc.num_accepted + 1)
