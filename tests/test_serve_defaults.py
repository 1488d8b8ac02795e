"""`vllm serve` on vLLM's defaults (issue 23, part 2). On a large GPU vLLM
fills max_num_seqs 1024 and max_num_batched_tokens 8192 for the OpenAI
server, then keeps draft-pass slots per sequence free: with a 16-block head
(14 slots) that is 8192 - 1024 x 14 = -6144 tokens a step, and vLLM refused
to start (H200, 2026-12-02). A jetspec engine fits the limits the user did
not give to a whole tree per sequence, and names the flags when the user's
own cannot work. Tested through vLLM's config path (what ``vllm serve``
runs before it starts the engine) with the GPU's defaults forced."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from models import make_tiny_qwen3

GPU_DEFAULTS = ({"LLM_CLASS": 16384, "OPENAI_API_SERVER": 8192},
                {"LLM_CLASS": 1024, "OPENAI_API_SERVER": 1024})


def fit(seqs, tokens, seqs_given, tokens_given, budget=16, slots=14):
    from vllm_jetspec.vllm_patches.config import fit_batch_limits
    a = SimpleNamespace(max_num_seqs=seqs, max_num_batched_tokens=tokens)
    fit_batch_limits(a, budget, slots, seqs_given, tokens_given)
    return a.max_num_seqs, a.max_num_batched_tokens


def test_fit_batch_limits():
    # Nothing given: vLLM's step budget kept, sequences lowered.
    assert fit(1024, 8192, False, False) == (273, 8192)    # 8192 // 30
    assert fit(256, 2048, False, False) == (68, 2048)      # CPU serve
    assert fit(4, 8192, False, False) == (4, 8192)         # fits already
    assert fit(1024, 20, False, False) == (1, 30)
    # max_num_seqs given: tokens raised to a whole tree per sequence.
    assert fit(1024, 8192, True, False) == (1024, 30720)
    # max_num_batched_tokens given: sequences lowered.
    assert fit(1024, 3000, False, True) == (100, 3000)
    assert fit(1024, 20, False, True) == (1, 20)            # trees cut
    with pytest.raises(ValueError, match=r"^jetspec: --max-num-batched-"
                       r"tokens 14 leaves no token to schedule"):
        fit(1024, 14, False, True)
    # Both given: left alone when they work, one error when they cannot.
    assert fit(1024, 8192, True, True, slots=7) == (1024, 8192)
    with pytest.raises(ValueError) as e:
        fit(1024, 8192, True, True)
    assert str(e.value).startswith(
        "jetspec: --max-num-batched-tokens 8192 and --max-num-seqs 1024 "
        "leave no token to schedule: vLLM keeps 14 slots per sequence free "
        "for the draft pass (1024 x 14 = 14336); a whole tree per sequence "
        "needs max_num_batched_tokens >= max_num_seqs x (tree_budget 16 + "
        "14 draft-pass slots) = 30720")


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """A tiny target and a random head of block 16 (depth 15: 14 slots per
    sequence kept free for the draft pass, as the H200 run's head)."""
    from vllm_jetspec.head import HeadConfig, random_head, save_head

    d = tmp_path_factory.mktemp("serve_defaults")
    target = make_tiny_qwen3(d / "target")
    hc = HeadConfig.for_target(target, num_layers=1, target_layer_ids=[0, 1],
                               block_size=16, intermediate_size=256)
    save_head(random_head(hc), hc, d / "head")
    return str(target), str(d / "head")


@pytest.fixture
def gpu_defaults(monkeypatch):
    """vLLM's batch defaults for a GPU of >= 70 GiB (H100/H200), whatever
    this machine is, and vLLM's config path with the plugin's patches."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    from vllm_jetspec.vllm_patches import apply
    apply()
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")    # restored after
    tokens, seqs = ({UsageContext[k]: v for k, v in d.items()}
                    for d in GPU_DEFAULTS)
    monkeypatch.setattr(EngineArgs, "get_batch_defaults",
                        classmethod(lambda cls, world_size: (tokens, seqs)))
    return UsageContext


def engine_config(target, spec, usage, **kw):
    """``vllm serve TARGET --speculative-config SPEC [flags]`` up to the
    engine's start: the config it would run with."""
    from vllm.engine.arg_utils import EngineArgs
    return EngineArgs(model=target, skip_tokenizer_init=True, dtype="float32",
                      max_model_len=1024, speculative_config=spec,
                      **kw).create_engine_config(usage)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_serve_starts_on_vllms_gpu_defaults(tiny16, gpu_defaults):
    target, head = tiny16
    server = gpu_defaults.OPENAI_API_SERVER
    spec = {"method": "jetspec", "model": head, "tree_budget": 16}
    # Stock dflash with the same head fails as on the H200 (not ours to
    # change: the plugin leaves every other method alone).
    with pytest.raises(Exception, match="max_num_scheduled_tokens is set to "
                       "-6144"):
        engine_config(target, {"method": "dflash", "model": head,
                               "num_speculative_tokens": 15}, server)
    log = Lines()
    logging.getLogger("vllm.jetspec.config").addHandler(log)
    try:
        c = engine_config(target, spec, server).scheduler_config
        assert (c.max_num_seqs, c.max_num_batched_tokens) == (273, 8192)
        assert c.max_num_scheduled_tokens == 8192 - 273 * 14 >= 273 * 16
        assert any("max_num_seqs 1024 (vLLM's default) lowered to 273"
                   in x for x in log.lines), log.lines
        # --max-num-seqs 1024: tokens raised instead.
        c = engine_config(target, spec, server,
                          max_num_seqs=1024).scheduler_config
        assert (c.max_num_seqs, c.max_num_batched_tokens) == (1024, 30720)
        assert c.max_num_scheduled_tokens == 1024 * 16
        # The offline LLM class's defaults (16384 tokens) go the same way.
        c = engine_config(target, spec,
                          gpu_defaults.LLM_CLASS).scheduler_config
        assert (c.max_num_seqs, c.max_num_batched_tokens) == (546, 16384)
    finally:
        logging.getLogger("vllm.jetspec.config").removeHandler(log)
    # The user's own limits that cannot work: one error naming the flags.
    with pytest.raises(ValueError, match="^jetspec: --max-num-batched-tokens "
                       "8192 and --max-num-seqs 1024 leave no token to "
                       "schedule"):
        engine_config(target, spec, server, max_num_seqs=1024,
                      max_num_batched_tokens=8192)
    # tree_budget 1 is plain decoding: vLLM's defaults untouched.
    c = engine_config(target, dict(spec, tree_budget=1), server)
    assert c.speculative_config is None
    assert c.scheduler_config.max_num_seqs == 1024
