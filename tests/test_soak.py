"""A short soak (``python -m vllm_jetspec.soak``) in CI: a tiny random fp32
target with a character tokenizer and a random head, ~200 mixed requests at
concurrency 8 through three servers (no-spec, jetspec, no-spec again), with
aborts, unsupported parameters, preemption bursts and every kind of bad
input. It must show 0 greedy and 0 seeded differences, no failures but the
bad requests' own errors, each bad input answered (4xx, or normally where
the request is valid) and equally by both servers, and healthy servers with
nothing left running at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from models import tiny_qwen3_in_memory

# Lower-case letters, digits, punctuation: enough for the soak's synthetic
# prompts, stop strings and structured-output patterns.
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 \n.,?!:'\"{}[]-_")
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny_served_model(path: Path) -> tuple[Path, Path]:
    """A tiny fp32 Qwen3 (vocab = a character tokenizer's 55 tokens, peaked
    logits, so a random head gets drafts accepted by chance) saved with that
    tokenizer and a chat template, so a server can answer chat and text
    completions; and a random one-layer head for it (block 8)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vllm_jetspec.head import HeadConfig, random_head, save_head

    target, head = path / "target", path / "head"
    if (head / "config.json").exists():
        return target, head
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"),
                                            behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                   eos_token="<|im_end|>", pad_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    model = tiny_qwen3_in_memory(vocab=len(vocab), hidden=128, head_dim=32)
    model.config.eos_token_id = vocab["<|im_end|>"]
    model.config.bos_token_id = None
    model.config.pad_token_id = 0
    model.save_pretrained(target)
    fast.save_pretrained(target)
    hc = HeadConfig.for_target(target, num_layers=1, target_layer_ids=[0, 2],
                               block_size=8, intermediate_size=256)
    save_head(random_head(hc, seed=0), hc, head)
    return target, head


def soak_args(target: Path, head: Path, out: Path) -> list[str]:
    spec = {"method": "jetspec", "model": str(head), "tree_budget": 16}
    return ["--model", str(target), "--spec-config", json.dumps(spec),
            "--prompts", "synthetic", "--num-requests", "200",
            "--concurrency", "8", "--max-num-seqs", "8",
            "--max-model-len", "512", "--max-tokens", "48",
            # 40 blocks of 16 tokens: a burst of 8 long prompts cannot fit.
            "--num-gpu-blocks", "40", "--bursts", "2", "--burst-size", "8",
            "--abort-frac", "0.05", "--bad-frac", "0.08",
            "--time-limit", "420", "--startup-timeout", "600",
            "--seed", "1", "--out", str(out)]


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    from vllm_jetspec import soak as soak_mod

    d = tmp_path_factory.mktemp("soak")
    target, head = make_tiny_served_model(d / "models")
    rc = soak_mod.main(soak_args(target, head, d / "out"))
    report = json.loads((d / "out" / "soak.json").read_text())
    print(report["summary"], file=sys.stderr)
    return rc, report


@pytest.mark.engine
def test_soak_verdict(soak):
    rc, rep = soak
    assert rep["verdict"]["ok"], rep["verdict"]["reasons"]
    assert rc == 0
