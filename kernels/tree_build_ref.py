"""Torch reference of ``tree_build.build_tree_rows``: ``tree.build_tree``
and ``tree.packed_ancestor_mask``, written out in the row layout the V2
draft pass keeps (what ``vllm_patches/v2/speculator.py`` stored from them
before the fused kernel)."""

from __future__ import annotations

import torch

from vllm_jetspec.tree import build_tree, packed_ancestor_mask


def build_tree_rows_ref(logp: torch.Tensor, ids: torch.Tensor,
                        anchor: torch.Tensor, budget: int,
                        algo: str = "accum_logp", layout: str = "depth"
                        ) -> tuple[torch.Tensor, ...]:
    """[R, D, K] log-probs and ids, [R] anchors -> (draft [R, B-1] tokens of
    nodes 1.. with 0 for padding, parents [R, B] with -1 for the root and
    padding, depth [R, B] with 0 for padding, masks [R, B, ceil(B/64)]
    packed ancestor rows, num_nodes [R])."""
    tree = build_tree(logp, ids, anchor, budget, algo=algo, layout=layout)
    nodes = tree.tokens[:, 1:]
    return (torch.where(nodes >= 0, nodes, 0), tree.parents,
            tree.depth.clamp(min=0), packed_ancestor_mask(tree),
            tree.num_nodes)
