"""Tree construction under a node budget, batched over requests.

The parallel draft head gives, for each depth ``d`` of the block, a
distribution that does not depend on which tokens were drafted at shallower
depths. A candidate node at depth ``d`` is therefore a path
``(k_1, ..., k_d)`` of top-K indices with cumulative log-prob
``sum_i logp[i, k_i]``; every algorithm below selects a prefix-closed set of
such paths.

Algorithms (``budget`` counts the root, so ``budget - 1`` draft nodes):

- ``topb_prefix``: the ``budget - 1`` paths with the highest cumulative
  log-prob (DDTree's construction) - the tree that maximises the expected
  accepted length under the draft's own distribution.
- ``accum_logp``: best-first on cumulative log-prob, where at each depth only
  the ``width`` best nodes may have children (the per-depth frontier of
  JetSpec and EAGLE-2); then the ``budget - 1`` best nodes overall. Equal to
  ``topb_prefix`` whenever ``budget - 1 <= width``.
- ``top2gap_fanout``: per-depth fanout ``b_d = max(1, round(K * sigmoid(
  -beta * (g_d - gap0))))`` from the gap ``g_d`` (nats) between the top-1
  and top-2 log-probs, i.e. fewer siblings where the head is confident; then
  best-first (exact) over the allowed children.
- ``chain``: width 1, the linear DFlash baseline: the top-1 token at each
  depth, ``min(D, budget - 1)`` nodes.

All of it is tensor code with a static number of steps (one stable sort
per depth, one overall), so none of it synchronises with the device when
the budget is a Python int; equal path sums go to the shallower, then the
earlier candidate.
"""

from __future__ import annotations

import math

import torch

from .types import PAD, DraftTree

TREE_ALGOS = ("accum_logp", "top2gap_fanout", "topb_prefix", "chain")
LAYOUTS = ("depth", "best_first")
MAX_BUDGET = 256

# top2gap_fanout defaults: a gap of GAP0 nats halves the width; BETA sets how
# sharply the fanout falls as the head grows confident.
DEFAULT_BETA = 1.0
DEFAULT_GAP0 = 2.0


def top2gap_fanout(topk_logp: torch.Tensor, beta: float = DEFAULT_BETA,
                   gap0: float = DEFAULT_GAP0) -> torch.Tensor:
    """[R, D, K] sorted log-probs -> [R, D] int64 fanout per depth."""
    K = topk_logp.shape[-1]
    if K == 1:
        return torch.ones(topk_logp.shape[:-1], dtype=torch.long,
                          device=topk_logp.device)
    gap = topk_logp[..., 0] - topk_logp[..., 1]
    # A non-finite top-2 (one-token distribution) is a huge gap: fanout 1.
    gap = gap.masked_fill(torch.isnan(gap), math.inf)
    frac = torch.sigmoid(-beta * (gap - gap0))
    return torch.round(K * frac).long().clamp(min=1, max=K)


def build_tree(
    topk_logp: torch.Tensor,
    topk_ids: torch.Tensor,
    anchor: torch.Tensor,
    budget: int | torch.Tensor,
    algo: str = "accum_logp",
    width: int | None = None,
    max_budget: int | None = None,
    beta: float = DEFAULT_BETA,
    gap0: float = DEFAULT_GAP0,
    layout: str = "depth",
) -> DraftTree:
    """Build one tree per request.

    Args:
        topk_logp: [R, D, K] float, the head's top-K log-probs per depth.
        topk_ids: [R, D, K] int64, their token ids (distinct within a depth).
        anchor: [R] int64, the root token of each tree.
        budget: nodes per tree including the root (1..256), an int or an
            [R] int64 tensor of per-request budgets (e.g. clipped near
            ``max_model_len``).
        algo: one of ``TREE_ALGOS``.
        width: use only the first ``width`` of the K candidates per depth
            (default: all K). For ``accum_logp`` it is also the per-depth
            frontier.
        max_budget: slots per tree in the output (default: ``budget`` when an
            int, else ``budget.max()``, which synchronises).
        beta, gap0: ``top2gap_fanout`` parameters.
        layout: node order, one of ``LAYOUTS``: ``"depth"`` (by depth, then
            best first) or ``"best_first"`` (best first: by cumulative
            log-prob, ties to the shallower, then to the earlier candidate
            - still topological, a parent before its children). Under
            ``best_first`` the first ``b`` nodes are ``truncate_tree(tree,
            b)``'s nodes (for ``accum_logp`` and ``topb_prefix``: the tree
            of budget ``b``), so an engine may verify any prefix of the
            tree (``tree_budget: "auto"`` on vLLM's V2 runner, whose
            scheduler picks the drafts per step).

    Non-finite log-probs (tokens the head gives no mass) never become nodes,
    so a tree may hold fewer than ``budget`` nodes.
    """
    if algo not in TREE_ALGOS:
        raise ValueError(f"unknown tree algorithm {algo!r}; "
                         f"expected one of {TREE_ALGOS}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown tree layout {layout!r}; "
                         f"expected one of {LAYOUTS}")
    if topk_logp.dim() != 3 or topk_ids.shape != topk_logp.shape:
        raise ValueError("topk_logp and topk_ids must both be [R, D, K], got "
                         f"{tuple(topk_logp.shape)} and "
                         f"{tuple(topk_ids.shape)}")
    R, D, K = topk_logp.shape
    if anchor.shape != (R,):
        raise ValueError(f"anchor must be [R]={R}, got {tuple(anchor.shape)}")
    if width is not None:
        if not 1 <= width <= K:
            raise ValueError(f"width must be in [1, {K}], got {width}")
        topk_logp, topk_ids = topk_logp[..., :width], topk_ids[..., :width]
        K = width
    if isinstance(budget, int):
        n_slots = budget if max_budget is None else max_budget
        if not 1 <= budget <= n_slots:
            raise ValueError(f"budget must be in [1, {n_slots}], got {budget}")
        budget_r = torch.full((R,), budget, dtype=torch.long,
                              device=topk_logp.device)
    else:
        budget_r = budget.to(device=topk_logp.device, dtype=torch.long)
        n_slots = int(budget_r.max()) if max_budget is None else max_budget
    if not 1 <= n_slots <= MAX_BUDGET:
        raise ValueError(f"tree budget must be in [1, {MAX_BUDGET}], "
                         f"got {n_slots}")

    # Sort each depth's candidates, best first (the head's top-K usually
    # is); stable, so equal log-probs keep the head's order.
    logp = topk_logp.float()
    logp, order = logp.masked_fill(torch.isnan(logp), -math.inf).sort(
        dim=-1, descending=True, stable=True)
    ids = topk_ids.long().gather(-1, order)

    if algo == "chain":
        logp = logp.masked_fill(
            torch.arange(K, device=logp.device) >= 1, -math.inf)
    elif algo == "top2gap_fanout":
        fan = top2gap_fanout(logp, beta, gap0)  # [R, D]
        allowed = torch.arange(K, device=logp.device) < fan[..., None]
        logp = logp.masked_fill(~allowed, -math.inf)
    return _select_best_prefixes(logp, ids, anchor.long(), budget_r, n_slots,
                                 max(1, frontier_of(algo, K, n_slots)),
                                 best_first=layout == "best_first")


def frontier_of(algo: str, K: int, n_slots: int) -> int:
    """How many nodes of a depth may have children, per algorithm."""
    return {"chain": 1, "accum_logp": K}.get(algo, n_slots - 1)


def beam_sizes(D: int, K: int, n_slots: int,
               frontier: int) -> tuple[int, list[int]]:
    """Static sizes of the beam loop: the frontier's width ``n_beam`` and,
    per depth (at most ``min(D, n_slots - 1)``), how many candidates are
    kept, the best ``m_d`` children of the frontier (the best ``n_beam`` of
    which are the next frontier)."""
    n_draft = n_slots - 1
    n_beam = max(1, min(frontier, n_draft))
    sizes, prev = [], 1
    for _ in range(min(D, n_draft)):
        sizes.append(min(n_draft, prev * K))
        prev = min(n_beam, sizes[-1])
    return n_beam, sizes


def _select_best_prefixes(logp: torch.Tensor, ids: torch.Tensor,
                          anchor: torch.Tensor, budget_r: torch.Tensor,
                          n_slots: int, frontier: int,
                          best_first: bool = False) -> DraftTree:
    """The ``budget_r - 1`` best paths (cumulative log-prob) among those whose
    every proper prefix is among the ``frontier`` best candidates of its
    depth.

    With ``frontier >= n_slots - 1`` this is the exact top-(B-1): a path in
    the global top set has a prefix that is at least as good, so at most
    B-2 other paths of the prefix's depth beat it.
    Ties are broken by depth (shallower first) and then by candidate order,
    which keeps the selection prefix-closed: a parent's key is never worse
    than its child's (log-probs are <= 0 and float addition is monotone).
    """
    R, D, K = logp.shape
    dev = logp.device
    n_draft = n_slots - 1
    n_beam, sizes = beam_sizes(D, K, n_slots, frontier)
    depth_limit = len(sizes)
    cand_cum, cand_idx = [], []
    prev_cum = torch.zeros(R, 1, device=dev)
    for d in range(depth_limit):
        # Children of the frontier as (frontier index * K + candidate):
        # the only kernels a depth costs are this sum and its top-m; the
        # parents and tokens are decoded for every depth at once below.
        c = (prev_cum[:, :, None] + logp[:, d, None, :]).reshape(
            R, prev_cum.shape[1] * K)
        # A stable sort, whatever the row's width: ties go to the earlier
        # candidate, so the tree is a function of the inputs (a topk picks
        # among equal path sums as it likes: it did for rows over 1024
        # candidates until 2026-12-03, and the Triton build,
        # kernels/tree_build.py, must give the same tree). On short rows
        # it is also one bitonic sort kernel where topk is a radix select
        # plus that sort (H200 trace, 2026-12-03: ≈ 8 + 4 µs a depth).
        top_cum, top_idx = c.sort(dim=1, descending=True, stable=True)
        top_cum, top_idx = top_cum[:, :sizes[d]], top_idx[:, :sizes[d]]
        cand_cum.append(top_cum)
        cand_idx.append(top_idx)
        prev_cum = top_cum[:, :min(n_beam, sizes[d])]

    tokens = torch.full((R, n_slots), PAD, dtype=torch.long, device=dev)
    parents = torch.full_like(tokens, PAD)
    depth = torch.full_like(tokens, PAD)
    cum_out = torch.full((R, n_slots), -math.inf, device=dev)
    tokens[:, 0] = anchor
    depth[:, 0] = 0
    cum_out[:, 0] = 0.0
    if depth_limit == 0:
        return DraftTree(tokens, parents, depth, cum_out,
                         torch.ones(R, dtype=torch.long, device=dev), 0)

    cum = torch.cat(cand_cum, 1)          # [R, C], laid out by depth
    idx = torch.cat(cand_idx, 1)
    # Each column's depth (1-based) and the offset of the depth before it
    # (its frontier's first column; the root's children: PAD, whose local
    # index is 0), then parent = that offset + frontier index, token =
    # the depth's candidate.
    col_depth, prev_off = _column_layout(sizes, dev)
    par_g = prev_off + idx // K               # [R, C] global candidate index
    tok = ids.reshape(R, D * K).gather(1, (col_depth - 1) * K + idx % K)
    dep = col_depth.expand(R, -1)
    C = cum.shape[1]

    # Global best-first order; the stable sort keeps shallower first on ties.
    _, order = cum.sort(dim=1, descending=True, stable=True)
    n_sel = min(n_draft, C)
    sel = order[:, :n_sel]                                    # [R, n_sel]
    rank = torch.arange(n_sel, device=dev)
    sel_cum = cum.gather(1, sel)
    keep = torch.isfinite(sel_cum) & (rank[None, :] < budget_r[:, None] - 1)

    # Topological layout: by depth, then by rank (or by rank alone, which
    # is topological too: a parent's rank is lower than its child's);
    # dropped ones go last.
    sel_dep = dep.gather(1, sel)
    key = torch.where(keep, rank if best_first else sel_dep * n_sel + rank,
                      (D + 2) * n_sel + rank)
    perm = key.argsort(dim=1)
    sel = sel.gather(1, perm)
    keep = keep.gather(1, perm)

    # Candidate -> node index map (dropped candidates go to a spare column).
    node_of = torch.full((R, C + 1), PAD, dtype=torch.long, device=dev)
    node_idx = (1 + rank).expand(R, n_sel)
    node_of.scatter_(1, torch.where(keep, sel, C), node_idx)
    p_g = par_g.gather(1, sel)
    p_node = torch.where(p_g < 0, 0, node_of.gather(1, p_g.clamp(min=0)))

    body = slice(1, 1 + n_sel)
    tokens[:, body] = torch.where(keep, tok.gather(1, sel), PAD)
    parents[:, body] = torch.where(keep, p_node, PAD)
    depth[:, body] = torch.where(keep, dep.gather(1, sel), PAD)
    cum_out[:, body] = torch.where(keep, cum.gather(1, sel), -math.inf)
    num_nodes = 1 + keep.sum(1)
    return DraftTree(tokens, parents, depth, cum_out, num_nodes, depth_limit)


def _column_layout(sizes: list[int], dev) -> tuple[torch.Tensor,
                                                    torch.Tensor]:
    """[C] depth (1-based) of each candidate column, and [C] the first
    column of the depth before it (PAD for depth 1), for depths of
    ``sizes[d]`` columns laid out one after another. Made on the device
    from Python ints (no host-to-device copy: the draft pass runs inside a
    CUDA graph); a few kernels when every depth after the first has the
    same size (the usual case), one pair per depth otherwise."""
    C = sum(sizes)
    ar = torch.arange(C, device=dev)
    m0 = sizes[0]
    if len(sizes) == 1 or all(m == sizes[1] for m in sizes[1:]):
        m1 = sizes[1] if len(sizes) > 1 else 1
        rest = (ar - m0).clamp(min=0) // m1            # 0 for depth 2
        col_depth = torch.where(ar < m0, 1, 2 + rest)
        prev_off = torch.where(ar < m0, PAD, (rest - 1) * m1 + m0)
        prev_off = torch.where((ar >= m0) & (rest == 0), 0, prev_off)
        return col_depth, prev_off
    col_depth = torch.ones(C, dtype=torch.long, device=dev)
    prev_off = torch.full((C,), PAD, dtype=torch.long, device=dev)
    start = 0
    for d, m in enumerate(sizes):
        if d:
            col_depth[start:start + m] = d + 1
            prev_off[start:start + m] = start - sizes[d - 1]
        start += m
    return col_depth, prev_off


def truncate_tree(tree: DraftTree, budget: int) -> DraftTree:
    """The tree of ``budget`` nodes (root included) that ``build_tree`` makes
    with the same top-K for ``accum_logp`` and ``topb_prefix`` (up to exact
    ties in path log-prob, not checked for), from
    one it made with a larger budget: its ``budget - 1`` best nodes by
    cumulative log-prob, ties to the shallower, then to the earlier node (what the
    stable sort in ``_select_best_prefixes`` does; nodes are laid out by
    depth, then by that rank), kept in their layout. Prefix-closed for the
    same reason. Any device; no synchronisation. ``max_depth`` is kept (a
    static bound)."""
    R, N = tree.tokens.shape
    if budget >= N:
        return tree
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    dev = tree.device
    ar = torch.arange(N, device=dev)
    valid = ar[None, :] < tree.num_nodes[:, None]
    key = torch.where(valid, tree.cum_logp.float(), -math.inf)
    key[:, 0] = math.inf                                   # the root first
    order = key.sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, ar.expand(R, N))
    keep = valid & (rank < budget)
    new_index = keep.long().cumsum(1) - 1
    # The kept nodes in their layout order, then the rest.
    pos = torch.where(keep, ar, N + ar).argsort(dim=1)[:, :budget]
    kept = keep.gather(1, pos)
    par = tree.parents.gather(1, pos)
    parents = torch.where(kept & (par >= 0),
                          new_index.gather(1, par.clamp(min=0)), PAD)
    return DraftTree(
        torch.where(kept, tree.tokens.gather(1, pos), PAD), parents,
        torch.where(kept, tree.depth.gather(1, pos), PAD),
        torch.where(kept, tree.cum_logp.gather(1, pos), -math.inf),
        keep.sum(1), tree.max_depth)
