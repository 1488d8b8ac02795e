"""Brute-force oracles for the tree core tests: plain Python loops over the
definitions, no shared code with the implementation."""

from __future__ import annotations

import itertools
import math

import torch


def all_paths(logp: torch.Tensor, max_len: int):
    """Every path (tuple of top-K indices) of length 1..max_len of one
    request's [D, K] log-probs, with its float32 cumulative log-prob computed
    depth by depth (the same summation order as the implementation)."""
    D, K = logp.shape
    out = []
    for d in range(1, min(D, max_len) + 1):
        for ks in itertools.product(range(K), repeat=d):
            c = torch.zeros((), dtype=torch.float32)
            for i, k in enumerate(ks):
                c = c + logp[i, k].float()
            out.append((ks, float(c)))
    return out


def topb_values(logp: torch.Tensor, budget: int) -> list[float]:
    """Sorted cumulative log-probs of the best budget-1 finite paths."""
    vals = sorted((c for _, c in all_paths(logp, budget - 1)
                   if math.isfinite(c)), reverse=True)
    return vals[:budget - 1]


def frontier_values(logp: torch.Tensor, budget: int, frontier: int
                    ) -> list[float]:
    """accum_logp by its definition: at each depth every child of the
    ``frontier`` best nodes of the previous depth is a candidate; then the
    budget-1 best candidates overall."""
    D, K = logp.shape
    cands = []
    beam = [((), 0.0)]
    for d in range(min(D, budget - 1)):
        kids = []
        for ks, c in beam:
            for k in range(K):
                kids.append((ks + (k,), float(torch.tensor(c, dtype=torch.float32)
                                               + logp[d, k].float())))
        kids.sort(key=lambda x: -x[1])
        cands.extend(kids)
        beam = kids[:frontier]
    vals = sorted((c for _, c in cands if math.isfinite(c)), reverse=True)
    return vals[:budget - 1]


def node_paths(tokens, parents, n):
    """Token path (excluding the root) of each of the first n nodes."""
    paths = {0: ()}
    for i in range(1, n):
        paths[i] = paths[int(parents[i])] + (int(tokens[i]),)
    return paths


def greedy_accept(tokens, parents, depth, n, target):
    """Deepest node whose every path token equals the target token at its
    parent; returns (node, emitted tokens)."""
    best = 0
    for i in range(1, n):
        ok, j = True, i
        while j != 0:
            p = int(parents[j])
            if int(tokens[j]) != int(target[p]):
                ok = False
                break
            j = p
        if ok and int(depth[i]) > int(depth[best]):
            best = i
    path = []
    j = best
    while j != 0:
        path.append(int(tokens[j]))
        j = int(parents[j])
    return best, path[::-1] + [int(target[best])]
