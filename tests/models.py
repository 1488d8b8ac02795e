"""Tiny models with random weights, saved to disk, for engine tests."""

from __future__ import annotations

from pathlib import Path


def make_tiny_qwen3(path: Path, seed: int = 0, vocab: int = 512,
                    layers: int = 2) -> Path:
    """A Qwen3 target small enough to start in seconds on CPU (fp32)."""
    import torch
    import transformers

    if (path / "config.json").exists():
        return path
    cfg = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=128, intermediate_size=256,
        num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(path)
    return path
