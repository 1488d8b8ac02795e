"""The reference tree attention equals causal attention along each node's
own path (the definition of tree verification), for random trees, GQA and
scattered pages."""

from __future__ import annotations

import pytest
import torch

from vllm_jetspec.kernels.tree_attention_ref import tree_attention_ref
from vllm_jetspec.tree import build_tree, packed_ancestor_mask


def causal_path_attention(q_i, ks, vs, scale, group):
    """Plain attention of one query over an explicit key sequence."""
    k = ks.float().repeat_interleave(group, dim=1)
    v = vs.float().repeat_interleave(group, dim=1)
    s = torch.einsum("hd,khd->hk", q_i.float(), k) * scale
    return torch.einsum("hk,khd->hd", s.softmax(-1), v)


@pytest.mark.parametrize("budget", [1, 5, 64, 130])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_matches_attention_along_each_path(budget, hq, hkv):
    g = torch.Generator().manual_seed(budget * 10 + hq)
    R, D, block_size = 3, 16, 8
    prefix = torch.tensor([0, 5, 17])
    logp = torch.randn(R, 6, 50, generator=g).log_softmax(-1)
    v, i = logp.topk(4, dim=-1)
    tree = build_tree(v, i, torch.zeros(R, dtype=torch.long), budget,
                      algo="topb_prefix")
    n = tree.num_nodes
    # Pages scattered at random over the cache.
    max_blocks = (int((prefix + budget).max()) + block_size - 1) // block_size
    num_blocks = R * max_blocks + 5
    perm = torch.randperm(num_blocks, generator=g)[:R * max_blocks]
    block_table = perm.view(R, max_blocks)
    k_cache = torch.randn(num_blocks, block_size, hkv, D, generator=g)
    v_cache = torch.randn(num_blocks, block_size, hkv, D, generator=g)
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)])
    q = torch.randn(int(qsl[-1]), hq, D, generator=g)
    scale = D ** -0.5
    out = tree_attention_ref(q, k_cache, v_cache, block_table, prefix, qsl,
                             packed_ancestor_mask(tree), scale)
    kf, vf = k_cache.view(-1, hkv, D), v_cache.view(-1, hkv, D)
    for r in range(R):
        p = int(prefix[r])

        def slot(pos):
            return int(block_table[r, pos // block_size]) * block_size \
                + pos % block_size
        for node in range(int(n[r])):
            path, j = [], node
            while j >= 0:
                path.append(j)
                j = int(tree.parents[r, j])
            seq = list(range(p)) + [p + j for j in reversed(path)]
            idx = torch.tensor([slot(x) for x in seq])
            ref = causal_path_attention(q[int(qsl[r]) + node], kf[idx],
                                        vf[idx], scale, hq // hkv)
            torch.testing.assert_close(out[int(qsl[r]) + node], ref,
                                       atol=1e-5, rtol=1e-5)
