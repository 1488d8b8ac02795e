"""The reference decoder against the target's own decoding."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from models import tiny_qwen3_in_memory
from vllm_jetspec.head import HeadConfig, random_head
from vllm_jetspec.reference import (ReferenceDecoder, SamplingConfig,
                                    TreeConfig, target_greedy)
from vllm_jetspec.tree import TREE_ALGOS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: thread start-up costs more than the math on 2 cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    target = tiny_qwen3_in_memory()
    hc = HeadConfig.for_target(target.config, num_layers=1,
                               target_layer_ids=[0, 2], block_size=8)
    return target, random_head(hc, seed=1)


PROMPTS = [[1, 2, 3, 4, 5], [7], [3, 3, 9, 12, 0, 5, 5, 1, 14, 2, 8]]


@pytest.mark.parametrize("algo", TREE_ALGOS)
@pytest.mark.parametrize("budget", [1, 8, 64])
def test_greedy_equals_target_greedy(tiny, algo, budget):
    target, head = tiny
    dec = ReferenceDecoder(target, head, TreeConfig(budget=budget, algo=algo,
                                                    width=4))
    taus = []
    for prompt in PROMPTS:
        r = dec.generate(prompt, 40)
        assert r.token_ids == target_greedy(target, prompt, 40)
        taus.append(r.tau)
    if budget == 1:
        assert all(t == 1.0 for t in taus)
    else:  # tiny vocabulary: a random head does get drafts accepted
        assert max(taus) > 1.3, taus


def test_eos_and_max_tokens(tiny):
    target, head = tiny
    dec = ReferenceDecoder(target, head, TreeConfig(budget=16, width=4))
    full = target_greedy(target, PROMPTS[0], 30)
    eos = full[7]
    r = dec.generate(PROMPTS[0], 30, eos_token_id=eos)
    assert r.token_ids == full[:full.index(eos) + 1]
    assert dec.generate(PROMPTS[0], 5).token_ids == full[:5]


def test_mismatched_head_is_rejected(tiny):
    target, _ = tiny
    other = tiny_qwen3_in_memory(vocab=32)
    hc = HeadConfig.for_target(other.config, num_layers=1,
                               target_layer_ids=[0], block_size=4)
    with pytest.raises(ValueError, match="does not fit"):
        ReferenceDecoder(target, random_head(hc))


def test_sampling_matches_target_distribution(tiny):
    """First and second emitted tokens at temperature 0.8 follow the
    target's exact distributions (chi-square, fixed seeds)."""
    target, head = tiny
    dec = ReferenceDecoder(target, head, TreeConfig(budget=64, width=7))
    prompt = [1, 2, 3]
    temp = 0.8
    with torch.no_grad():
        base = target(torch.tensor([prompt])).logits[0, -1] / temp
        p1 = base.softmax(-1).double()
        nxt = torch.stack([
            target(torch.tensor([prompt + [t]])).logits[0, -1] / temp
            for t in range(p1.numel())]).softmax(-1).double()
    p2 = p1 @ nxt
    runs = 2000
    x1, x2, acc = [], [], 0
    for seed in range(runs):
        r = dec.generate(prompt, 2, SamplingConfig(temperature=temp,
                                                   seed=seed))
        x1.append(r.token_ids[0])
        x2.append(r.token_ids[1])
        acc += r.accepted[0] if r.accepted else 0
    assert acc > runs * 0.2  # the tree path was exercised
    for xs, p in ((x1, p1), (x2, p2)):
        obs = torch.bincount(torch.tensor(xs), minlength=p.numel()).double()
        keep = p * runs >= 5
        other_obs = obs[~keep].sum()
        other_p = p[~keep].sum()
        o = torch.cat([obs[keep], other_obs[None]]).numpy()
        e = torch.cat([p[keep], other_p[None]]) * runs
        e = (e / e.sum() * o.sum()).numpy()
        _, pval = chisquare(o, e)
        assert pval > 1e-3, pval
