"""``min_p`` and ``logit_bias`` on jetspec engines
(``vllm_patches/logits_params.py``): vLLM's refusal stays for every other
speculative method; a jetspec config accepts them and gets vLLM's built-in
logits processors. The engine-level check (answers equal to no-spec
through a served jetspec engine) is the soak's (``tests/test_soak.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm import SamplingParams

from vllm_jetspec.vllm_patches import apply
from vllm_jetspec.vllm_patches.logits_params import patched_build_logitsprocs

apply()
JETSPEC = SimpleNamespace(jetspec=object())   # settings_of(...) is not None
OTHER = SimpleNamespace()                      # e.g. dflash, eagle3, ngram


@pytest.mark.parametrize("kw", [dict(min_p=0.1), dict(logit_bias={3: 5.0})])
def test_refused_by_other_methods_accepted_by_jetspec(kw):
    p = SamplingParams(**kw)
    with pytest.raises(ValueError, match="not yet supported with speculative"):
        p._validate_spec_decode(OTHER)
    assert p._validate_spec_decode(JETSPEC) is None
    assert p._validate_spec_decode(None) is None


def test_builtin_processors_for_jetspec_only():
    seen = []

    def orig(vllm_config, device, pin, pooling, custom=()):
        seen.append(vllm_config)
        return "vllm's"

    build = patched_build_logitsprocs(orig)
    cfg = SimpleNamespace(speculative_config=OTHER)
    assert build(cfg, "cpu", False, False) == "vllm's"
    # Custom processors and pooling models: vLLM's own branch decides.
    jet = SimpleNamespace(speculative_config=JETSPEC)
    assert build(jet, "cpu", False, False, ["x.Y"]) == "vllm's"
    assert build(jet, "cpu", False, True) == "vllm's"
    assert len(seen) == 3
