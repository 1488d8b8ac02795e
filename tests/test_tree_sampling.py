"""The tree sampler in chunks of requests (``tree.sample_nodes``): the
same draws as one ``sample_target_tokens`` call over the padded batch."""

from __future__ import annotations

import torch

from vllm_jetspec.tree import sample_nodes, sample_target_tokens


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    counts = [5, 1, 8, 3, 8, 2]
    R, N, V = len(counts), 8, 37
    flat = torch.randn(sum(counts), V, generator=g) * 3
    padded = torch.zeros(R, N, V)
    start = 0
    for r, n in enumerate(counts):
        padded[r, :n] = flat[start:start + n]
        start += n
    temp = torch.tensor([0.7, 0.0, 1.0, 1.3, 0.9, 1.0])
    top_k = torch.tensor([0, 5, 10, 0, 3, 40])
    top_p = torch.tensor([0.9, 1.0, 0.5, 1.0, 0.95, 0.8])
    return counts, N, flat, padded, temp, top_k, top_p


def test_chunks_draw_what_one_call_draws():
    """Every request seeded: for every chunk size (one request a chunk up
    to the whole batch) the tokens equal one unchunked call's, node for
    node; greedy requests get the argmax."""
    counts, N, flat, padded, temp, top_k, top_p = _batch(0)
    R, V = len(counts), flat.shape[-1]

    def gens():
        return {r: torch.Generator().manual_seed(100 + r) for r in range(R)}
    want = sample_target_tokens(padded, temp, top_k, top_p, gens())
    for per_chunk in (1, 2, 4, R):
        got = sample_nodes(flat, counts, N, temp, top_k, top_p, gens(),
                           max_elems=per_chunk * N * V)
        for r, n in enumerate(counts):
            assert torch.equal(got[r, :n], want[r, :n]), (per_chunk, r)
    assert torch.equal(got[1, :1], padded[1, :1].argmax(-1))


def test_chunks_unseeded_and_mixed():
    """Unseeded requests draw fresh noise per chunk (only the law
    matters); seeded ones in the same chunk keep their exact draws; every
    token is one the request's top-k admits."""
    counts, N, flat, padded, temp, top_k, top_p = _batch(1)
    R, V = len(counts), flat.shape[-1]
    gens = {2: torch.Generator().manual_seed(7)}
    want = sample_target_tokens(padded, temp, top_k, top_p,
                                {2: torch.Generator().manual_seed(7)})
    got = sample_nodes(flat, counts, N, temp, top_k, top_p, gens,
                       max_elems=3 * N * V)
    assert torch.equal(got[2, :counts[2]], want[2, :counts[2]])
    start = 0
    for r, n in enumerate(counts):
        k = min(int(top_k[r]) or V, V)
        allowed = flat[start:start + n].topk(k, dim=-1).indices
        assert (allowed == got[r, :n, None]).any(-1).all(), r
        start += n
