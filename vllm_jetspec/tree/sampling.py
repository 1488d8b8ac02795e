"""Target-side sampling at every tree node, with vLLM's semantics.

vLLM's V1 sampler (``vllm/v1/sample/sampler.py``, 0.26) treats a request as
greedy when ``temperature < 1e-5``; otherwise it divides the logits by the
temperature, masks everything below the k-th largest logit (top-k), masks
the low tail whose cumulative probability is ``<= 1 - p`` (top-p, always
keeping the most likely token), and samples by the exponential race
``argmax(probs / q)``, ``q ~ Exp(1)``. The same is done here for every node
of every tree, so ``accept`` sees one draw per node from exactly the
distribution vLLM would sample from at that context.
"""

from __future__ import annotations

import torch

SAMPLING_EPS = 1e-5


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask ``logits`` [M, V] in place; ``top_k`` [M] int (``<= 0`` or
    ``>= V``: off), ``top_p`` [M] float (``>= 1``: off)."""
    if top_k is None and top_p is None:
        return logits
    V = logits.shape[-1]
    srt, idx = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        k = top_k.long()
        k = torch.where((k <= 0) | (k > V), V, k)
        kth = srt.gather(1, (V - k)[:, None])
        srt.masked_fill_(srt < kth, float("-inf"))
    if top_p is not None:
        cum = srt.softmax(dim=-1, dtype=torch.float32).cumsum(dim=-1)
        tail = cum <= (1 - top_p.float())[:, None]
        tail[:, -1] = False
        srt.masked_fill_(tail, float("-inf"))
    return logits.scatter_(-1, idx, srt)


def depth_noise(generator: torch.Generator, depth: torch.Tensor, V: int,
                device: torch.device) -> tuple[torch.Tensor, list]:
    """Exp(1) noise for the nodes of one seeded request's tree, shared by
    depth, and the generator's state after each depth's draw.

    vLLM's sampler draws one ``exponential_`` of ``V`` values from a seeded
    request's generator per step (``random_sample``); here row ``d`` is
    that draw ``d`` steps on, and every node at depth ``d`` uses it. A node
    at depth ``d`` is only ever emitted as the ``d``-th token of the round,
    and the path to it depends on the rows of smaller depths only, so each
    emitted token is still drawn from its own context's distribution,
    independently; and with the same logits the emitted tokens are the
    ones plain decoding with the same seed gives. After acceptance the
    caller sets the generator to ``states[k - 1]`` for ``k`` emitted tokens,
    where ``k`` steps of plain decoding would have left it.

    Args:
        depth: [n] int64 (host) each node's depth; -1 (padding) takes row 0.

    Returns: noise [n, V] float32 on ``device``; states, a list of
    ``max(depth) + 1`` generator states (``states[d]``: after row ``d``).
    """
    rows = int(depth.max()) + 1 if depth.numel() else 1
    q = torch.empty(rows, V, device=device)
    states = []
    for d in range(rows):
        q[d].exponential_(generator=generator)
        states.append(generator.get_state())
    return q[depth.clamp(min=0).to(device)], states


def sample_target_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    generators: dict[int, torch.Generator] | None = None,
    noise: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One target token per node.

    Args:
        logits: [R, N, V] target logits at every node (not modified).
        temperature: [R] float; ``< 1e-5`` means greedy for that request.
        top_k, top_p: [R] per-request settings or None.
        generators: request index -> seeded ``torch.Generator`` (the noise of
            those requests is drawn from it, node by node in slot order).
        noise: request index -> [n <= N, V] Exp(1) noise for its first
            ``n`` nodes (``depth_noise``), used instead of its generator.

    Returns: [R, N] int64.
    """
    R, N, V = logits.shape
    greedy_tok = logits.argmax(dim=-1)
    x = logits.float() / torch.where(temperature < SAMPLING_EPS, 1.0,
                                     temperature.float())[:, None, None]
    flat = x.reshape(R * N, V)
    rep = lambda t: None if t is None else t.repeat_interleave(N)  # noqa: E731
    flat = apply_top_k_top_p(flat, rep(top_k), rep(top_p))
    probs = flat.softmax(dim=-1).view(R, N, V)
    q = torch.empty_like(probs)
    generators = generators or {}
    noise = noise or {}
    if len(set(generators) | set(noise)) != R:
        q.exponential_()
    for i, g in generators.items():
        if i not in noise:
            q[i].exponential_(generator=g)
    for i, n in noise.items():
        q[i, :n.shape[0]] = n
        q[i, n.shape[0]:] = 1.0
    sampled = (probs / q).argmax(dim=-1)
    return torch.where((temperature < SAMPLING_EPS)[:, None], greedy_tok,
                       sampled)


# Elements per chunk of ``sample_nodes``: every fp32 temporary of one
# chunk (scaled logits, probabilities, noise, their ratio) is at most
# 128 MiB. Unchunked, batch 32 x budget 128 x Qwen3's 151,936-token
# vocabulary made ~2.5 GB per temporary and ran a GPU out of memory
# mid-run (H100, 2026-11-24): memory vLLM's profile run does not reserve.
SAMPLE_CHUNK_ELEMS = 1 << 25


def sample_nodes(logits: torch.Tensor, counts: list[int], N: int,
                 temperature: torch.Tensor, top_k: torch.Tensor | None = None,
                 top_p: torch.Tensor | None = None,
                 generators: dict[int, torch.Generator] | None = None,
                 max_elems: int = SAMPLE_CHUNK_ELEMS,
                 noise: dict[int, torch.Tensor] | None = None
                 ) -> torch.Tensor:
    """``sample_target_tokens`` over a flat batch, a few requests at a time.

    Args:
        logits: [sum(counts), V] one row per node, request after request.
        counts: nodes of each request (<= N).
        N: nodes per request in the result.
        temperature, top_k, top_p, generators, noise: as
            ``sample_target_tokens`` (per request of the whole batch).
        max_elems: at most this many ``[requests, N, V]`` elements per chunk
            (at least one request).

    Returns: [R, N] int64, padding nodes' entries arbitrary. A seeded
    request draws its noise exactly as in one ``sample_target_tokens``
    call over the batch (node by node from its generator), so chunking
    changes no seeded result.
    """
    R, V = len(counts), logits.shape[-1]
    out = torch.empty((R, N), dtype=torch.long, device=logits.device)
    step = max(1, max_elems // max(1, N * V))
    gens = generators or {}
    noise = noise or {}
    start = 0
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        node_logits = logits.new_zeros((r1 - r0, N, V))
        for r in range(r0, r1):
            node_logits[r - r0, :counts[r]] = logits[start:start + counts[r]]
            start += counts[r]
        sl = slice(r0, r1)
        out[sl] = sample_target_tokens(
            node_logits, temperature[sl],
            None if top_k is None else top_k[sl],
            None if top_p is None else top_p[sl],
            {i - r0: g for i, g in gens.items() if r0 <= i < r1},
            {i - r0: n for i, n in noise.items() if r0 <= i < r1})
    return out
