"""The per-request tree policy and sampling settings against vLLM's own
SamplingParams / SamplingMetadata types."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from vllm_jetspec.tree import sample_target_tokens
from vllm_jetspec.vllm_patches.sampling import (node_sampling_inputs,
                                                tree_unsupported_reason)


@pytest.mark.parametrize("kw", [
    dict(), dict(temperature=0.0), dict(temperature=0.7, top_k=20, top_p=0.9),
    dict(seed=3, temperature=1.0), dict(stop=["\n"], max_tokens=5),
    dict(ignore_eos=True),
])
def test_supported_requests(kw):
    assert tree_unsupported_reason(SamplingParams(**kw)) is None


@pytest.mark.parametrize("kw,name", [
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(min_p=0.1), "min_p"),
    (dict(logit_bias={5: 2.0}), "logit_bias"),
    (dict(allowed_token_ids=[1, 2]), "allowed_token_ids"),
    (dict(min_tokens=4), "min_tokens"),
    (dict(logprobs=2), "logprobs"),
    (dict(structured_outputs=StructuredOutputsParams(regex="a+")),
     "structured outputs"),
])
def test_unsupported_requests_say_why(kw, name):
    assert name in tree_unsupported_reason(SamplingParams(**kw))


def test_node_sampling_inputs_from_vllm_metadata():
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    g = torch.Generator().manual_seed(0)
    md = SamplingMetadata(
        temperature=torch.tensor([0.0, 0.8, 1.0]), all_greedy=False,
        all_random=False, top_p=torch.tensor([1.0, 0.9, 1.0]),
        top_k=torch.tensor([0, 5, 0]), generators={2: g},
        max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(3), presence_penalties=torch.zeros(3),
        repetition_penalties=torch.ones(3), output_token_ids=[[], [], []],
        allowed_token_ids_mask=None, bad_words_token_ids={},
        logitsprocs=LogitsProcessors())
    temp, k, p, gens = node_sampling_inputs(md, 3, torch.device("cpu"))
    assert temp.tolist() == [0.0, pytest.approx(0.8), 1.0]
    assert gens == {2: g}
    logits = torch.randn(3, 4, 50)
    out = sample_target_tokens(logits, temp, k, p, gens)
    assert torch.equal(out[0], logits[0].argmax(-1))   # greedy row
    # Row 1 only ever emits tokens inside its top-5.
    top5 = logits[1].topk(5, -1).indices
    assert (out[1][:, None] == top5).any(-1).all()
