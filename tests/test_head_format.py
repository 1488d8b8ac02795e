"""Published JetSpec heads (issue 23, part 1): JetSpec's own dialect of the
DFlash config (``dflash_config.causal_head``, top-level ``block_size`` and
``num_target_layers``, ``target_layer_ids`` derived when absent,
``target_hidden_size``, ``repo::subfolder``) is read, and vLLM is handed a
``dflash_config`` that runs the head as its author meant; each malformed
variant gets one line naming the key. The engine test runs the shipped head
rewritten in JetSpec's dialect through vLLM: same tokens and same τ as with
its own config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from models import make_tiny_qwen3

# The tiny target has 2 layers, hidden 128, vocab 512.
TINY = dict(hidden_size=128, vocab=512, layers=2)


def jetspec_dialect(cfg: dict, ids: bool = True) -> dict:
    """``cfg`` (our dialect) as JetSpec's ``DFlashDraftModel`` saves it:
    ``causal_head`` instead of ``causal``, ``block_size`` and
    ``num_target_layers`` at the top level only, ``target_hidden_size`` in
    ``dflash_config``; without ``ids`` no ``target_layer_ids``."""
    cfg = json.loads(json.dumps(cfg))
    dc = cfg.pop("dflash_config")
    cfg["block_size"] = dc["block_size"]
    cfg["dflash_config"] = {"mask_token_id": dc["mask_token_id"],
                            "causal_head": dc["causal"],
                            "target_hidden_size": cfg["hidden_size"]}
    if ids:
        cfg["dflash_config"]["target_layer_ids"] = dc["target_layer_ids"]
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny target, a one-layer head for it in our dialect, its config in
    JetSpec's, and the config of a two-layer head without layer ids."""
    from vllm_jetspec.head import HeadConfig, random_head, save_head

    d = tmp_path_factory.mktemp("head_format")
    target = make_tiny_qwen3(d / "target")
    hc = HeadConfig.for_target(target, num_layers=1, target_layer_ids=[0, 1],
                               block_size=8, intermediate_size=256)
    save_head(random_head(hc, seed=0), hc, d / "ours")
    return target, d, hc


def write_head(d: Path, cfg: dict, weights_from: Path | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if weights_from is not None:
        os.symlink(weights_from / "model.safetensors", d / "model.safetensors")
    return d


# --------------------------------------------------------------- unit tests
def test_derived_target_layer_ids_follow_jetspec():
    """JetSpec's build_target_layer_ids: one layer -> the middle target
    layer; n layers -> evenly from 1 to num_target_layers - 3, rounded."""
    from vllm_jetspec.head.config import derive_target_layer_ids as ids
    assert ids(36, 5) == [1, 9, 17, 25, 33]        # Qwen3-8B, 5-layer head
    assert ids(48, 5) == [1, 12, 23, 34, 45]       # Qwen3-30B-A3B
    assert ids(36, 1) == [18] and ids(29, 1) == [14]
    assert ids(30, 4) == [1, 10, 18, 27]
    assert ids(36, 3) == [1, 17, 33]
    assert ids(8, 3) == [1, 3, 5]                  # 1 + 2 * 2 / 2 = 3
    assert ids(7, 3) == [1, 2, 4]                  # 2.5 rounds to even: 2


def test_jetspec_dialect_reads_as_ours(tiny):
    from vllm_jetspec.head import HeadConfig
    _, d, hc = tiny
    ours = json.loads((d / "ours" / "config.json").read_text())
    theirs = HeadConfig.from_dict(jetspec_dialect(ours))
    assert theirs == hc and theirs.causal and theirs.dialect == "jetspec"
    assert HeadConfig.from_dict(ours).dialect == "vllm"
    # Without ids: derived from num_target_layers and the head's layers.
    two = dict(jetspec_dialect(ours, ids=False), num_hidden_layers=2)
    two["num_target_layers"] = 36
    c = HeadConfig.from_dict(two)
    assert c.target_layer_ids == [1, 33] and c.layer_ids_derived
    # No causality key at all: bidirectional, as both loaders read it.
    bare = jetspec_dialect(ours)
    del bare["dflash_config"]["causal_head"]
    assert not HeadConfig.from_dict(bare).causal


def one_line_error(cfg: dict, target=None) -> str:
    from vllm_jetspec.head import HeadConfig
    with pytest.raises(ValueError) as e:
        c = HeadConfig.from_dict(cfg)
        if target is not None:
            c.check_target(target)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_malformed_heads_get_one_line_each(tiny):
    target, d, _ = tiny
    base = jetspec_dialect(json.loads((d / "ours" / "config.json")
                                      .read_text()))

    def variant(**dc):
        c = json.loads(json.dumps(base))
        c["dflash_config"].update(dc)
        return {k: v for k, v in c.items()}

    no_mask = variant()
    del no_mask["dflash_config"]["mask_token_id"]
    assert "lacks dflash_config.mask_token_id" in one_line_error(no_mask)
    assert "mask_token_id 600 is outside the vocabulary" in one_line_error(
        variant(mask_token_id=600))
    # Layer ids beyond the head's own num_target_layers, and beyond the
    # target's layers.
    assert "reference layers beyond the target's 2 layers" in \
        one_line_error(variant(target_layer_ids=[0, 5]))
    assert "reference layers the 2-layer target does not have" in \
        one_line_error(dict(variant(target_layer_ids=[0, 5]),
                            num_target_layers=0), target)
    no_ids = variant()
    del no_ids["dflash_config"]["target_layer_ids"]
    assert "lacks dflash_config.target_layer_ids and num_target_layers" in \
        one_line_error(dict(no_ids, num_target_layers=0))
    # Hidden size: an adapter head (JetSpec's random HiddenDimAdapter), a
    # head for a wider target, a head for a target of other depth or vocab.
    assert "dflash_config.target_hidden_size 256 != hidden_size 128" in \
        one_line_error(variant(target_hidden_size=256))
    wide = dict(base, hidden_size=256, head_dim=64)
    wide["dflash_config"] = dict(base["dflash_config"],
                                 target_hidden_size=256)
    assert "hidden_size: head 256 != target 128" in one_line_error(
        wide, target)
    assert "vocab_size: head 1024 != target 512" in one_line_error(
        dict(base, vocab_size=1024), target)
    assert "num_target_layers: head made for a 36-layer target, this " \
        "target has 2 layers" in one_line_error(
            dict(base, num_target_layers=36), target)
    assert "causal (True) and dflash_config.causal_head (False) disagree" \
        in one_line_error(variant(causal=True, causal_head=False))
    assert "causal_head must be true or false" in one_line_error(
        variant(causal_head="yes"))
    assert "block_size 8 (top level) and dflash_config.block_size 16 " \
        "disagree" in one_line_error(variant(block_size=16))


def test_repo_subfolder_and_hub_ids(tiny, tmp_path, monkeypatch):
    """``"repo::subfolder"`` (JetSpec's form for a repo of several heads)
    for a local directory and a Hugging Face repo id (through
    huggingface_hub's snapshot_download, its cache and offline mode)."""
    import huggingface_hub

    from vllm_jetspec.vllm_patches.config import resolve_head
    _, d, _ = tiny
    repo = tmp_path / "heads"
    write_head(repo / "b16", json.loads((d / "ours" / "config.json")
                                        .read_text()))
    assert resolve_head(f"{repo}::b16") == (str(repo / "b16"), False)
    with pytest.raises(ValueError, match="no head config at .*/b32/config"):
        resolve_head(f"{repo}::b32")
    seen = {}

    def fake_download(repo_id, revision=None, allow_patterns=None):
        seen.update(repo_id=repo_id, revision=revision,
                    allow_patterns=allow_patterns)
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_head("JetSpec/jetspec-heads::b16", "main") == (
        str(repo / "b16"), True)
    assert seen == dict(repo_id="JetSpec/jetspec-heads", revision="main",
                        allow_patterns=["b16/*"])

    def offline(*a, **k):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="the Hugging Face hub gave no head "
                       r"\(OSError: offline mode is enabled\)"):
        resolve_head("JetSpec/jetspec-qwen3-8b")


def test_vllm_is_handed_what_the_author_meant(tiny, tmp_path, monkeypatch):
    """Through vLLM's own config path (``EngineArgs.create_engine_config``,
    what ``LLM`` and ``vllm serve`` call; no engine): the draft model's hf
    config carries ``dflash_config.causal`` (what vLLM's
    ``qwen3_dflash.py`` reads) and the derived ``target_layer_ids`` (what
    the runner's aux-layer list reads); ``head_type`` overrides."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.qwen3_dflash import (
        dflash_has_any_non_causal)

    from vllm_jetspec.vllm_patches import apply
    apply()                              # idempotent; inert but for jetspec

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")   # restored after
    target, d, _ = tiny
    ours = json.loads((d / "ours" / "config.json").read_text())
    no_ids = dict(jetspec_dialect(ours, ids=False), num_target_layers=2)
    head = write_head(tmp_path / "js", no_ids)

    def draft_config(**extra):
        c = EngineArgs(model=str(target), skip_tokenizer_init=True,
                       dtype="float32", max_model_len=256,
                       max_num_seqs=4, max_num_batched_tokens=512,
                       speculative_config={
                           "method": "jetspec", "model": str(head),
                           "tree_budget": 8, **extra}).create_engine_config()
        hf = c.speculative_config.draft_model_config.hf_config
        return hf, c.speculative_config.jetspec

    hf, s = draft_config()
    # One head layer on a 2-layer target: the middle layer, 2 // 2 = 1.
    assert hf.dflash_config == {"mask_token_id": 511,
                                "target_layer_ids": [1], "causal": True}
    assert hf.model.dflash_config == hf.dflash_config
    assert not dflash_has_any_non_causal(hf) and s.causal and s.depth == 7
    hf, s = draft_config(head_type="bidirectional")
    assert dflash_has_any_non_causal(hf) and not s.causal
    # A bidirectional head (causal_head false) runs as such: the tree path
    # verifies whatever the head drafts (engine-checked on CPU with replay,
    # docs/published-heads.md), drafting every slot of its block.
    bidir = json.loads(json.dumps(no_ids))
    bidir["dflash_config"]["causal_head"] = False
    write_head(tmp_path / "js", bidir)
    hf, s = draft_config(tree_budget=4)
    assert dflash_has_any_non_causal(hf) and s.depth == 7
    hf, s = draft_config(tree_budget=4, head_type="causal")
    assert not dflash_has_any_non_causal(hf) and s.depth == 3


# -------------------------------------------------------------- the engine
@pytest.mark.engine
def test_shipped_head_in_jetspec_dialect_runs_the_same(tmp_path):
    """The shipped SmolLM2 head, its config rewritten as JetSpec saves
    heads (``causal_head``, top-level ``block_size``, no
    ``dflash_config.causal``): through vLLM the same tokens and the same
    spec-decode counts (τ) as with its own config."""
    from transformers import AutoTokenizer

    from vllm_jetspec.tools import assets
    from vllm_jetspec.tools.engine_job import run_job
    from vllm_jetspec.tools.eval_tau import encode_prompts
    from vllm_jetspec.heads import shipped_head_dir

    target = str(assets.default_model_dir())
    ours = shipped_head_dir()
    js = write_head(tmp_path / "jetspec_dialect", jetspec_dialect(
        json.loads((ours / "config.json").read_text())), weights_from=ours)
    cfg = json.loads((js / "config.json").read_text())
    assert "causal" not in cfg["dflash_config"]
    prompts = encode_prompts(assets.load_prompts("gsm8k", limit=2),
                             AutoTokenizer.from_pretrained(target), chat=True)

    def job(head):
        return dict(target=target, prompts=prompts, batch_sizes=[2],
                    max_new_tokens=48, spec={
                        "method": "jetspec", "model": str(head),
                        "tree_budget": 16},
                    engine=dict(max_num_seqs=2, max_num_batched_tokens=1024,
                                max_model_len=1024))

    a = run_job(job(ours))
    b = run_job(job(js))
    assert "causal (dflash_config.causal_head True)" in b["log"]
    ra, rb = a["batches"]["2"], b["batches"]["2"]
    assert rb["ids"] == ra["ids"]
    assert (rb["drafts"], rb["accepted"]) == (ra["drafts"], ra["accepted"])
    assert ra["accepted"] / ra["drafts"] > 0.5     # trees really accepted


BIDIR_RUN = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    spec = json.loads(sys.argv[2])
    llm = LLM(sys.argv[1], skip_tokenizer_init=True, dtype="float32",
              enforce_eager=True, max_model_len=512, max_num_seqs=4,
              max_num_batched_tokens=512, gpu_memory_utilization=0.1,
              speculative_config=spec, disable_log_stats=False)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in json.loads(sys.argv[3])],
        SamplingParams(max_tokens=31, temperature=0, detokenize=False))
    emit("result", [list(o.outputs[0].token_ids) for o in outs])
    emit("metrics", {x.name: x.value for x in llm.get_metrics() if x.name in (
        "vllm:spec_decode_num_drafts",
        "vllm:spec_decode_num_accepted_tokens")})
"""


@pytest.mark.engine
def test_bidirectional_head_runs_as_such(tiny, tmp_path):
    """A head whose config says bidirectional (JetSpec's ``causal_head``
    false) runs non-causally through the tree path: with the drafts
    replaced by the recorded no-spec output (``replay``) every round
    accepts its whole branch, and the tokens equal no-spec's (batch 4,
    mixed prompt lengths, a budget below the head's depth + 1)."""
    from engine_io import result, run_script

    from vllm_jetspec.replay import save_replay
    target, d, _ = tiny
    ours = json.loads((d / "ours" / "config.json").read_text())
    cfg = jetspec_dialect(ours)
    cfg["dflash_config"]["causal_head"] = False
    head = write_head(tmp_path / "bidir", cfg, weights_from=d / "ours")
    prompts = [[(7 * i + 3) % 500 for i in range(n)] for n in (3, 40, 100, 7)]

    def run(spec):
        res, log = run_script(tmp_path / "run.py", BIDIR_RUN,
                              [target, json.dumps(spec), json.dumps(prompts)])
        return result(res, "result", log), result(res, "metrics", log), log

    no_spec, _, _ = run(None)
    save_replay(str(tmp_path / "replay.json"), prompts, no_spec)
    tokens, m, log = run({"method": "jetspec", "model": str(head),
                          "tree_budget": 6,
                          "replay": str(tmp_path / "replay.json")})
    assert "bidirectional (dflash_config.causal_head False)" in log
    assert tokens == no_spec
    drafts = m["vllm:spec_decode_num_drafts"]
    # A tree of 6 nodes holds at most 5 of the head's 7 depths; 31 tokens
    # = the prefill's 1 + 5 rounds of 6, each within the recording (a
    # round past its end would draft from the head itself).
    assert drafts > 0 and m["vllm:spec_decode_num_accepted_tokens"] == \
        5 * drafts
