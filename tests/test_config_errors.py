"""Bad speculative configs at start-up (issue 22, part 2; issue 23, part 3):
every jetspec key with a wrong type or an out-of-range value, an unknown
key, a missing head, a head for another target, and the keys of JetSpec's
vLLM fork — each gives one clear error (one line) naming the key. Through
the config path (``parse``, and vLLM's ``EngineArgs.create_engine_config``,
which ``LLM`` and ``vllm serve`` call first); no engine is started."""

from __future__ import annotations

import json

import pytest

from models import make_tiny_qwen3, make_tiny_target_and_head


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny target (2 layers, hidden 128, vocab 512), a random head for
    it (block 8), and heads for other targets."""
    from transformers import AutoConfig

    from vllm_jetspec.head import HeadConfig, random_head, save_head

    d = tmp_path_factory.mktemp("config_errors")
    target, head = make_tiny_target_and_head(d)
    for name, kw in [("wide", dict(hidden=256)), ("vocab", dict(vocab=1024)),
                     ("deep", dict(layers=4))]:
        other = d / f"target_{name}"
        if name == "wide":
            import transformers
            cfg = transformers.Qwen3Config(
                vocab_size=512, hidden_size=256, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64)
            cfg.save_pretrained(other)
        else:
            make_tiny_qwen3(other, **kw)
        hc = HeadConfig.for_target(other, num_layers=1,
                                   target_layer_ids=[0, 1], block_size=8,
                                   intermediate_size=256)
        save_head(random_head(hc), hc, d / f"head_{name}")
    (d / "not_a_head").mkdir()
    (d / "not_a_head" / "config.json").write_text(
        json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    (d / "broken").mkdir()
    (d / "broken" / "config.json").write_text("{not json")
    return AutoConfig.from_pretrained(target), str(head), d


def error(env, **keys) -> str:
    from vllm_jetspec.vllm_patches.config import parse
    hf, head, _ = env
    spec = {"method": "jetspec", "model": head, **keys}
    with pytest.raises(ValueError) as e:
        parse(spec, hf)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("jetspec: "), msg
    return msg


@pytest.mark.parametrize("keys,names", [
    # wrong type
    (dict(tree_budget="64"), "tree_budget must be an integer in [1, 256] "
                             "or 'auto', got '64'"),
    (dict(tree_budget=16.0), "tree_budget must be an integer in [1, 256]"),
    (dict(tree_budget=True), "tree_budget must be an integer"),
    (dict(tree_budget=None), "tree_budget must be an integer"),
    (dict(tree_width="7"), "tree_width must be an integer in [1, 64]"),
    (dict(tree_algo=3), "tree_algo must be one of"),
    (dict(tree_algo=["chain"]), "tree_algo must be one of"),
    (dict(num_speculative_tokens="3"), "num_speculative_tokens (draft "
                                       "depth) must be an integer"),
    (dict(head_type=1), "head_type must be one of"),
    (dict(replay=5), "replay must be a path"),
    (dict(tree_budget="auto", cost_model=5), "cost_model must be a path"),
    (dict(model=5), "model must be the head's directory or repo id"),
    # out of range
    (dict(tree_budget=0), "tree_budget must be an integer in [1, 256], "
                          "got 0"),
    (dict(tree_budget=257), "tree_budget must be an integer in [1, 256]"),
    (dict(tree_width=0), "tree_width must be an integer in [1, 64], got 0"),
    (dict(tree_width=65), "tree_width must be an integer in [1, 64]"),
    (dict(tree_algo="beam"), "tree_algo must be one of"),
    (dict(num_speculative_tokens=0), "num_speculative_tokens (draft depth) "
                                     "must be an integer in [1, 7], got 0"),
    (dict(num_speculative_tokens=8), "num_speculative_tokens (draft depth) "
                                     "must be an integer in [1, 7], got 8"),
    (dict(head_type="mixed"), "head_type must be one of ('auto', 'causal', "
                              "'bidirectional'), got 'mixed'"),
    (dict(tree_budget_max=8), "'cost_model' and 'tree_budget_max' go with "
                              "tree_budget 'auto'"),
    (dict(tree_budget="auto", tree_budget_max=1), "tree_budget_max must "
                                                  "be an integer in [2, 256]"),
    # unknown keys
    (dict(tree_bugdet=16), "unknown speculative_config key 'tree_bugdet' "
                           "(did you mean 'tree_budget'?)"),
    (dict(width=4), "unknown speculative_config key 'width'"),
    # JetSpec's fork: no counterpart, or a value we do not have
    (dict(tree_kv_layout="logical"), "tree_kv_layout 'logical' (a key of "
                                     "JetSpec's vLLM fork) is not supported"),
    (dict(tree_attn_kernel="optimus"), "tree_attn_kernel 'optimus'"),
    (dict(tree_construction="depth_first"), "tree_construction "
                                            "'depth_first'"),
    (dict(max_draft_passes=2), "max_draft_passes 2"),
    (dict(tree_draft="entropy"), "tree_draft 'entropy' (a key of JetSpec's "
                                 "vLLM fork) has no counterpart here; use "
                                 "tree_algo"),
    (dict(tree_hybrid_alpha=0.5), "tree_hybrid_alpha (a key of JetSpec's "
                                  "vLLM fork) has no counterpart"),
    (dict(tree_prune_ratio=0.25), "tree_prune_ratio"),
    (dict(num_cudagraph_tree_captures=4), "num_cudagraph_tree_captures"),
    (dict(max_tree_budget=32, tree_budget=16), "max_tree_budget (32, "
                                               "JetSpec's fork) and "
                                               "tree_budget (16) disagree"),
    (dict(max_tree_budget=300), "tree_budget must be an integer in "
                                "[1, 256], got 300"),
])
def test_bad_key_gives_one_line_naming_it(env, keys, names):
    assert names in error(env, **keys)


def test_missing_or_foreign_heads(env):
    _, _, d = env
    assert "'model' (the head's directory or Hugging Face repo id) is " \
        "required" in error(env, model=None)
    assert "no head directory" in error(env, model=str(d / "nowhere"))
    assert "no head config at" in error(env, model=str(d))
    assert "is not a DFlash-format head" in error(
        env, model=str(d / "not_a_head"))
    assert "config.json is not JSON" in error(env, model=str(d / "broken"))
    assert "hidden_size: head 256 != target 128" in error(
        env, model=str(d / "head_wide"))
    assert "vocab_size: head 1024 != target 512" in error(
        env, model=str(d / "head_vocab"))
    assert "num_target_layers: head made for a 4-layer target" in error(
        env, model=str(d / "head_deep"))


def test_fork_keys_with_a_meaning_here(env):
    """``max_tree_budget`` is ``tree_budget`` (both count the root),
    ``tree_draft`` maps to ``tree_algo``, ``head_type`` is JetSpec's; the
    fork's keys whose value is what jetspec does anyway are accepted."""
    from vllm_jetspec.vllm_patches.config import parse
    hf, head, _ = env
    spec, s = parse({"method": "jetspec", "model": head,
                     "max_tree_budget": 32, "tree_width": 5,
                     "tree_draft": "opt_prefix", "head_type": "causal",
                     "tree_kv_layout": "physical",
                     "tree_attn_kernel": "triton",
                     "tree_construction": "breadth_first",
                     "max_draft_passes": 0}, hf)
    assert spec == dict(method="dflash", model=head,
                        num_speculative_tokens=31)
    assert (s.budget, s.width, s.algo, s.causal) == (32, 5, "topb_prefix",
                                                     True)
    _, s = parse({"method": "jetspec", "model": head, "max_tree_budget": 16,
                  "tree_budget": 16, "tree_draft": "top2gap_fanout"}, hf)
    assert (s.budget, s.algo) == (16, "top2gap_fanout")


def test_errors_reach_the_user_through_vllm(env, monkeypatch):
    """The same errors through ``EngineArgs.create_engine_config`` (what
    ``LLM(...)`` and ``vllm serve`` run before any engine starts), and a
    vLLM key of the wrong type gets vLLM's own error naming that key."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_jetspec.vllm_patches import apply
    apply()
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")    # restored after
    hf, head, d = env
    target = str(d / "target")

    def start(**keys):
        with pytest.raises(Exception) as e:
            EngineArgs(model=target, skip_tokenizer_init=True,
                       dtype="float32", max_model_len=256,
                       speculative_config={"method": "jetspec",
                                           "model": head, **keys}
                       ).create_engine_config()
        return e.value

    e = start(tree_width=0)
    assert isinstance(e, ValueError) and str(e) == (
        "jetspec: tree_width must be an integer in [1, 64], got 0")
    e = start(tree_kv_layout="logical")
    assert "tree_kv_layout 'logical'" in str(e)
    e = start(max_model_len="long")
    assert "max_model_len" in str(e)

