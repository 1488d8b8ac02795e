"""Which requests may verify a tree, and the per-node sampling settings.

Tree verification draws one target token per node with vLLM's sampler
semantics (temperature, top-k, top-p, seeded generators:
``vllm_jetspec.tree.sample_target_tokens``). Anything else vLLM's sampler
applies to logits depends on the request's output history or emits extra
per-token data (penalties, min_p, logit bias, allowed/bad words, min_tokens,
structured output, logprobs, custom logits processors); the tree path
would emit tokens from a different distribution (or no logprobs). While such
a request runs, every batch that contains it decodes plainly (no drafts, so
vLLM's own sampler does the step), with a one-time warning; the other
requests get trees again once it has finished. A step in which such a
request meets drafts already scheduled for others keeps only each request's
root token, sampled by vLLM's sampler (``runner.wrap_sample``).
"""

from __future__ import annotations

import torch

from ..tree.sampling import SAMPLING_EPS


def tree_unsupported_reason(params) -> str | None:
    """Why a request with these ``vllm.SamplingParams`` must not verify a
    tree, or None when it may."""
    checks = [
        (params.presence_penalty != 0.0, "presence_penalty"),
        (params.frequency_penalty != 0.0, "frequency_penalty"),
        (params.repetition_penalty != 1.0, "repetition_penalty"),
        (params.min_p > 0.0, "min_p"),
        (bool(params.logit_bias), "logit_bias"),
        (bool(params.allowed_token_ids), "allowed_token_ids"),
        (bool(params.bad_words), "bad_words"),
        (params.min_tokens > 0, "min_tokens"),
        (params.structured_outputs is not None, "structured outputs"),
        (params.logprobs is not None, "logprobs"),
        (bool(params.logprob_token_ids), "logprob_token_ids"),
        (params.thinking_token_budget is not None, "thinking_token_budget"),
        (params.n > 1, "n > 1"),
        (bool(params.extra_args), "extra_args (custom logits processors)"),
    ]
    bad = [name for hit, name in checks if hit]
    return ", ".join(bad) if bad else None


def node_sampling_inputs(metadata, num_reqs: int, device: torch.device):
    """Per-request settings for ``sample_target_tokens`` from a batch's
    ``vllm.v1.sample.metadata.SamplingMetadata`` (rows = requests).

    Returns (temperature [R] float32 — 0 for greedy requests, top_k [R] or
    None, top_p [R] or None, generators {row: torch.Generator})."""
    if metadata.all_greedy or metadata.temperature is None:
        temp = torch.zeros(num_reqs, device=device)
    else:
        temp = metadata.temperature[:num_reqs].float().to(device)
        temp = torch.where(temp < SAMPLING_EPS, 0.0, temp)
    top_k = None if metadata.top_k is None else metadata.top_k[:num_reqs]
    top_p = None if metadata.top_p is None else metadata.top_p[:num_reqs]
    gens = {i: g for i, g in metadata.generators.items() if i < num_reqs}
    return temp, top_k, top_p, gens


def root_only_reason(params) -> str | None:
    """vLLM's V2 runner (``vllm_patches.v2``): why a request with these
    ``vllm.SamplingParams`` keeps only its root token each round, or None
    when it verifies whole trees.

    There every node is sampled by vLLM's own sampler with the node's
    position (``prefix + depth``): temperature, top-k, top-p, min_p, logit
    bias, allowed token ids, min_tokens and seeds act per node exactly as
    in plain decoding, and logprobs are read in path order. What reads the
    request's previous output tokens does not: penalties and bad words
    would count the nodes before a node in the step's flat order, not its
    ancestors; structured output validates drafts as a chain. Such a
    request verifies its tree but keeps the root's token (sampled with the
    request's whole history, as in plain decoding) - lossless, and the
    other requests of its batch keep their trees."""
    checks = [
        (params.presence_penalty != 0.0, "presence_penalty"),
        (params.frequency_penalty != 0.0, "frequency_penalty"),
        (params.repetition_penalty != 1.0, "repetition_penalty"),
        (bool(params.bad_words), "bad_words"),
        (params.structured_outputs is not None, "structured outputs"),
        (params.thinking_token_budget is not None, "thinking_token_budget"),
        (bool(params.extra_args), "extra_args (custom logits processors)"),
    ]
    bad = [name for hit, name in checks if hit]
    return ", ".join(bad) if bad else None
