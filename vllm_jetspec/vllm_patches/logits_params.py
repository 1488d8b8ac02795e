"""``min_p`` and ``logit_bias`` on jetspec engines (read from vLLM 0.26.0).

With any speculative config vLLM refuses both parameters at the API
(``SamplingParams._validate_spec_decode``: HTTP 400 "not yet supported with
speculative decoding") and builds only the min-tokens logits processor
(``build_logitsprocs``: "min_p and logit_bias parameters won't work with
speculative decoding"), because its rejection sampler scores several rows
per request. A jetspec engine never verifies drafts for a batch holding such
a request (``sampling.tree_unsupported_reason``: the batch decodes plainly,
one row per request, through vLLM's own sampler), so both can work as
without speculation: the request is accepted and the engine gets vLLM's
built-in logits processors. Found by the soak (``vllm_jetspec.tools.soak``): a
no-spec server answered these requests, a jetspec server refused them.
"""

from __future__ import annotations

from .config import settings_of


def patched_validate_spec_decode(orig):
    """Wraps ``SamplingParams._validate_spec_decode``: nothing to refuse
    for jetspec configs; vLLM's check for every other method."""
    if getattr(orig, "_jetspec_wrapped", False):
        return orig

    def _validate_spec_decode(self, speculative_config):
        if settings_of(speculative_config) is not None:
            return None
        return orig(self, speculative_config)
    _validate_spec_decode._jetspec_wrapped = True
    return _validate_spec_decode


def patched_build_logitsprocs(orig):
    """Wraps ``build_logitsprocs`` (as the runner module imported it): for
    jetspec configs the built-in processors (min-p, logit bias, min-tokens),
    as vLLM builds them without speculation; custom processors are still
    refused by vLLM's own branch."""
    if getattr(orig, "_jetspec_wrapped", False):
        return orig

    def build_logitsprocs(vllm_config, device, is_pin_memory,
                          is_pooling_model, custom_logitsprocs=()):
        if (is_pooling_model or custom_logitsprocs
                or settings_of(vllm_config.speculative_config) is None):
            return orig(vllm_config, device, is_pin_memory,
                        is_pooling_model, custom_logitsprocs)
        from vllm.v1.sample.logits_processor import (
            BUILTIN_LOGITS_PROCESSORS, LogitsProcessors)

        return LogitsProcessors(ctor(vllm_config, device, is_pin_memory)
                                for ctor in BUILTIN_LOGITS_PROCESSORS)
    build_logitsprocs._jetspec_wrapped = True
    return build_logitsprocs


def apply() -> None:
    """Install both wrappers (idempotent)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker import gpu_model_runner as gmr

    SamplingParams._validate_spec_decode = patched_validate_spec_decode(
        SamplingParams._validate_spec_decode)
    gmr.build_logitsprocs = patched_build_logitsprocs(gmr.build_logitsprocs)
