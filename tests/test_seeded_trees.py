"""Seeded sampling through trees emits, token for token, what vLLM's own
sampler emits step by step with the same seed (``tree.depth_noise`` +
the runner's generator rewind), on a bigram "target" whose logits depend
on the context's last token only, with draft trees that guess right, wrong
and partly right."""

from __future__ import annotations

import pytest
import torch

from vllm_jetspec.tree import accept, build_tree, sample_target_tokens
from vllm_jetspec.tree.sampling import depth_noise

V = 40


def vllm_step(logits, temp, k, p, gen):
    """One token of plain decoding as vLLM 0.26's sampler draws it for a
    seeded request (temperature, top-k/top-p, exponential race with one
    ``exponential_`` of V values from the request's generator)."""
    from vllm.v1.sample.ops.topk_topp_sampler import (apply_top_k_top_p,
                                                      random_sample)

    x = logits[None].float() / temp
    x = apply_top_k_top_p(x, None if k is None else torch.tensor([k]),
                          None if p is None else torch.tensor([p]))
    return int(random_sample(x.softmax(-1, dtype=torch.float32),
                             {0: gen})[0])


def plain(table, first, n, temp, k, p, seed):
    g = torch.Generator().manual_seed(seed)
    out, last = [], first
    for _ in range(n):
        last = vllm_step(table[last], temp, k, p, g)
        out.append(last)
    return out, g


def trees(table, first, n, temp, k, p, seed, budget, guess):
    """Rounds of: a tree of ``budget`` nodes from a draft that knows the
    target's top tokens with probability ``guess``, every node sampled with
    depth-shared noise, acceptance, generator set where plain decoding
    would leave it."""
    g = torch.Generator().manual_seed(seed)
    draft_rng = torch.Generator().manual_seed(seed + 1)
    out, last, rounds, deep = [], first, 0, 0
    while len(out) < n:
        depth, K = 5, 4
        ids = torch.empty(1, depth, K, dtype=torch.long)
        cur = last
        for d in range(depth):
            good = table[cur].topk(K).indices
            rand = torch.randperm(V, generator=draft_rng)[:K]
            use = good if torch.rand(1, generator=draft_rng) < guess else rand
            ids[0, d] = use
            cur = int(use[0])
        logp = torch.log_softmax(torch.randn(1, depth, K,
                                             generator=draft_rng), -1)
        logp = logp.sort(-1, descending=True).values
        tree = build_tree(logp, ids, torch.tensor([last]), budget)
        N = tree.tokens.shape[1]
        logits = table[tree.tokens[0].clamp(min=0)][None]        # [1, N, V]
        noise, states = depth_noise(g, tree.depth[0], V,
                                    torch.device("cpu"))
        tgt = sample_target_tokens(
            logits, torch.tensor([temp]),
            None if k is None else torch.tensor([k]),
            None if p is None else torch.tensor([p]), {0: g}, {0: noise})
        acc = accept(tree, tgt)
        a = int(acc.num_accepted[0])
        g.set_state(states[a])
        emitted = acc.tokens[0, :a + 1].tolist()
        out += emitted
        last = emitted[-1]
        rounds += 1
        deep += a
        assert N <= budget
    return out[:n], g, rounds, deep


@pytest.mark.parametrize("temp,k,p", [(1.0, None, None), (0.7, 10, None),
                                      (1.3, None, 0.8), (0.5, 5, 0.9)])
@pytest.mark.parametrize("budget,guess", [(16, 0.9), (8, 0.5), (2, 1.0)])
def test_tree_rounds_emit_plain_seeded_tokens(temp, k, p, budget, guess):
    g = torch.Generator().manual_seed(7)
    table = torch.randn(V, V, generator=g) * 2.5
    want, g_plain = plain(table, 3, 60, temp, k, p, seed=11)
    got, g_tree, rounds, deep = trees(table, 3, 60, temp, k, p, seed=11,
                                      budget=budget, guess=guess)
    assert got == want
    assert deep > 0, "no draft accepted: the test would be vacuous"
    if len(got) == 60 and rounds + deep == 60:
        # Both generators stand where 60 steps leave them.
        assert torch.equal(g_plain.get_state(), g_tree.get_state())


def test_depth_noise_rows_are_plain_steps():
    """Row d = the d-th [V] draw; states[d] = the state after it; padding
    nodes (depth -1) get row 0."""
    g = torch.Generator().manual_seed(3)
    depth = torch.tensor([0, 1, 1, 2, 3, 2, -1])
    q, states = depth_noise(g, depth, V, torch.device("cpu"))
    ref = torch.Generator().manual_seed(3)
    rows = []
    for d in range(4):
        rows.append(torch.empty(V).exponential_(generator=ref))
        assert torch.equal(states[d], ref.get_state())
    assert len(states) == 4
    for n, d in enumerate(depth.tolist()):
        assert torch.equal(q[n], rows[max(d, 0)])
