"""Acceptance and compaction: property tests against brute force, and the
losslessness of sampling acceptance (chi-square, fixed seeds)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from test_tree_build import draft
from tree_oracles import greedy_accept
from vllm_jetspec.tree import (TREE_ALGOS, accept, accept_greedy,
                               apply_top_k_top_p, build_tree,
                               compaction_plan, sample_target_tokens)


def targets_that_often_agree(tree, seed, agree=0.7, V=50):
    """A target token per node: with prob ``agree`` one of the node's
    children's tokens (so long paths get accepted), else a random token."""
    g = torch.Generator().manual_seed(seed)
    R, N = tree.tokens.shape
    tgt = torch.randint(0, V, (R, N), generator=g)
    for r in range(R):
        n = int(tree.num_nodes[r])
        kids: dict[int, list[int]] = {}
        for j in range(1, n):
            kids.setdefault(int(tree.parents[r, j]), []).append(j)
        for p, ch in kids.items():
            if torch.rand((), generator=g) < agree:
                pick = ch[int(torch.randint(0, len(ch), (), generator=g))]
                tgt[r, p] = tree.tokens[r, pick]
    return tgt


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 6),
       st.integers(1, 4), st.integers(1, 40), st.sampled_from(TREE_ALGOS),
       st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_greedy_acceptance_is_the_longest_matching_path(seed, R, D, K, B,
                                                        algo, agree):
    v, i = draft(seed, R, D, K)
    t = build_tree(v, i, torch.arange(R), B, algo=algo)
    tgt = targets_that_often_agree(t, seed, agree)
    acc = accept(t, tgt)
    plan = compaction_plan(acc)
    L = t.max_depth + 1
    assert acc.tokens.shape == (R, L) and acc.path_nodes.shape == (R, L)
    for r in range(R):
        n = int(t.num_nodes[r])
        best, emitted = greedy_accept(t.tokens[r], t.parents[r], t.depth[r],
                                      n, tgt[r])
        a = int(acc.num_accepted[r])
        assert int(acc.last_node[r]) == best
        assert a == len(emitted) - 1
        assert acc.tokens[r, :a + 1].tolist() == emitted
        assert (acc.tokens[r, a + 1:] == -1).all()
        # The kept path: root, then one node per depth down to `best`.
        path = acc.path_nodes[r, :a + 1].tolist()
        assert path[0] == 0 and path[-1] == best
        assert all(int(t.parents[r, path[d]]) == path[d - 1]
                   for d in range(1, a + 1))
        assert (acc.path_nodes[r, a + 1:] == -1).all()
        # The plan moves exactly the accepted nodes that are out of place,
        # each to its depth, and nothing else.
        moved = {(int(s), int(d)) for s, d in zip(plan.src[r], plan.dst[r])
                 if s >= 0}
        assert moved == {(p, d) for d, p in enumerate(path) if p != d}
        assert ((plan.src[r] >= 0) == (plan.dst[r] >= 0)).all()
        assert int(plan.num_kept[r]) == a + 1
        # In-place application in increasing dst never reads a slot that an
        # earlier move overwrote.
        written: set[int] = set()
        for s, d in sorted(moved, key=lambda x: x[1]):
            assert s not in written
            written.add(d)


def test_greedy_from_logits():
    v, i = draft(5, 2, 4, 3)
    t = build_tree(v, i, torch.tensor([1, 2]), 10, algo="topb_prefix")
    tgt = targets_that_often_agree(t, 5, 1.0)
    logits = torch.randn(2, 10, 50)
    logits.scatter_(2, tgt[:, :, None], 100.0)
    a, b = accept_greedy(t, logits), accept(t, tgt)
    assert torch.equal(a.tokens, b.tokens)


def test_root_only_tree_emits_the_bonus_token():
    v, i = draft(0, 2, 4, 3)
    t = build_tree(v, i, torch.tensor([4, 5]), 1)
    acc = accept(t, torch.tensor([[9], [8]]))
    assert acc.num_accepted.tolist() == [0, 0]
    assert acc.tokens[:, 0].tolist() == [9, 8]


# --- vLLM's sampling semantics ------------------------------------------------

def test_top_k_top_p_matches_vllm():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(16, 40, generator=g) * 3
        k = torch.randint(1, 41, (16,), generator=g)
        p = torch.rand(16, generator=g) * 0.9 + 0.05
        for kk, pp in ((k, None), (None, p), (k, p)):
            ours = apply_top_k_top_p(x.clone(), kk, pp)
            theirs = apply_top_k_top_p_pytorch(x.clone(), kk, pp)
            assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_greedy_requests_take_the_argmax():
    logits = torch.randn(3, 5, 11)
    temp = torch.tensor([0.0, 1.0, 0.0])
    out = sample_target_tokens(logits, temp)
    assert torch.equal(out[0], logits[0].argmax(-1))
    assert torch.equal(out[2], logits[2].argmax(-1))


def test_seeded_generators_reproduce():
    logits = torch.randn(2, 6, 30)
    temp = torch.ones(2)
    a = sample_target_tokens(logits, temp, generators={
        0: torch.Generator().manual_seed(7)})
    b = sample_target_tokens(logits, temp, generators={
        0: torch.Generator().manual_seed(7)})
    assert torch.equal(a[0], b[0])


# --- losslessness of sampling acceptance ----------------------------------------

V = 6
TRIALS = 120_000
P_MIN = 1e-3   # reject losslessness below this chi-square p-value


def bigram(seed):
    """A target that is a Markov chain over V tokens: logits[prev] -> next."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g) * 1.5


def processed_probs(logits, temperature, top_k, top_p):
    """The distribution vLLM samples from for one row of logits."""
    x = logits[None].float() / temperature
    kk = None if top_k is None else torch.tensor([top_k])
    pp = None if top_p is None else torch.tensor([top_p])
    return apply_top_k_top_p(x, kk, pp).softmax(-1)[0]


def expected(p):
    """Expected counts over TRIALS for probabilities ``p`` (renormalised in
    float64 so they sum to TRIALS exactly, as chisquare requires)."""
    p = p.double()
    return (p / p.sum() * TRIALS).numpy()


def run_round(T, anchors, draft_logp, draft_ids, budget, algo, temperature,
              top_k, top_p, gen):
    R = anchors.shape[0]
    t = build_tree(draft_logp.expand(R, -1, -1), draft_ids.expand(R, -1, -1),
                   anchors, budget, algo=algo)
    node_logits = T[t.tokens.clamp(min=0)]            # [R, N, V]
    temp = torch.full((R,), temperature)
    kk = None if top_k is None else torch.full((R,), top_k)
    pp = None if top_p is None else torch.full((R,), top_p)
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    tgt = sample_target_tokens(node_logits, temp, kk, pp)
    return accept(t, tgt)


def first_two_tokens(T, anchor, algo, budget, temperature, top_k, top_p,
                     seed, draft_logits):
    """Emit at least two tokens per trial (a second round where the first
    emitted only the bonus token) and return the first two."""
    gen = torch.Generator().manual_seed(seed)
    K = 3
    logp = draft_logits.log_softmax(-1)
    dv, di = logp.topk(K, dim=-1)
    anchors = torch.full((TRIALS,), anchor)
    acc = run_round(T, anchors, dv[None], di[None], budget, algo,
                    temperature, top_k, top_p, gen)
    x1 = acc.tokens[:, 0]
    x2 = acc.tokens[:, 1].clone()
    short = acc.num_accepted == 0
    acc2 = run_round(T, x1[short], dv[None], di[None], budget, algo,
                     temperature, top_k, top_p, gen)
    x2[short] = acc2.tokens[:, 0]
    assert (x2 >= 0).all()
    return x1, x2, acc.num_accepted.float().mean().item()


def deliberately_wrong_draft(T, anchor, depth=3):
    """Per-depth draft logits that differ from the target on purpose: the
    target's marginal at each depth, flattened (temperature 3) and with its
    two most likely tokens swapped."""
    P = T.softmax(-1)
    m = T[anchor].softmax(-1)
    rows = []
    for _ in range(depth):
        x = m.log() / 3
        a, b = x.topk(2).indices.tolist()
        x[[a, b]] = x[[b, a]]
        rows.append(x)
        m = m @ P
    return torch.stack(rows)


@pytest.mark.parametrize("algo,budget,temperature,top_k,top_p", [
    ("topb_prefix", 8, 1.0, None, None),
    ("accum_logp", 6, 0.8, None, None),
    ("top2gap_fanout", 10, 0.8, 4, 0.9),
    ("chain", 4, 1.3, None, 0.8),
])
def test_sampling_acceptance_is_lossless(algo, budget, temperature, top_k,
                                         top_p):
    T = bigram(1)
    anchor = 2
    draft_logits = deliberately_wrong_draft(T, anchor)
    x1, x2, mean_accepted = first_two_tokens(T, anchor, algo, budget, temperature, top_k,
                              top_p, seed=11, draft_logits=draft_logits)
    p1 = processed_probs(T[anchor], temperature, top_k, top_p)
    joint = p1[:, None] * torch.stack([
        processed_probs(T[a], temperature, top_k, top_p) for a in range(V)])
    obs = torch.bincount(x1 * V + x2, minlength=V * V).double()
    keep = joint.flatten() > 0
    # Tokens the target never samples (top-k/top-p) must never be emitted.
    assert obs[~keep].sum() == 0
    _, p_joint = chisquare(obs[keep].numpy(), expected(joint.flatten()[keep]))
    _, p_first = chisquare(torch.bincount(x1, minlength=V).double()[p1 > 0]
                           .numpy(), expected(p1[p1 > 0]))
    assert p_first > P_MIN, p_first
    assert p_joint > P_MIN, p_joint
    # Draft nodes were accepted often enough for the test to mean something.
    assert mean_accepted > 0.1, mean_accepted


def test_the_chi_square_test_catches_a_lossy_rule():
    """Power check: accepting the draft's top-1 without verification is
    detected by the same test."""
    T = bigram(1)
    anchor = 2
    gen = torch.Generator().manual_seed(3)
    draft_logits = -T[anchor]
    p1 = processed_probs(T[anchor], 1.0, None, None)
    x = torch.multinomial(p1, TRIALS, replacement=True, generator=gen)
    # Lossy: half of the time emit the draft's favourite instead.
    cheat = torch.rand(TRIALS, generator=gen) < 0.5
    x[cheat] = draft_logits.argmax()
    _, p = chisquare(torch.bincount(x, minlength=V).double().numpy(),
                     expected(p1))
    assert p < P_MIN
