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


def sample_target_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    generators: dict[int, torch.Generator] | None = None,
) -> torch.Tensor:
    """One target token per node.

    Args:
        logits: [R, N, V] target logits at every node (not modified).
        temperature: [R] float; ``< 1e-5`` means greedy for that request.
        top_k, top_p: [R] per-request settings or None.
        generators: request index -> seeded ``torch.Generator`` (the noise of
            those requests is drawn from it, node by node in slot order).

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
    if len(generators) != R:
        q.exponential_()
    for i, g in generators.items():
        q[i].exponential_(generator=g)
    sampled = (probs / q).argmax(dim=-1)
    return torch.where((temperature < SAMPLING_EPS)[:, None], greedy_tok,
                       sampled)
