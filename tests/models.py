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


def make_tiny_qwen3_moe(path: Path, seed: int = 0, vocab: int = 512,
                        layers: int = 2) -> Path:
    """A Qwen3-MoE target of the tiny model's size: 8 experts of width 64,
    top-2 routing (normalised) in every layer; its weights are saved once,
    so every engine (any TP/EP) loads the same numbers."""
    import torch
    import transformers

    if (path / "config.json").exists():
        return path
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256,
        moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(path)
    return path


def make_tiny_target_and_head(path: Path, moe: bool = False
                              ) -> tuple[Path, Path]:
    """``make_tiny_qwen3`` (or ``make_tiny_qwen3_moe``) plus a random
    one-layer dense head for it (block 8, so draft depth 7): acceptance
    comes from replay, not from the head."""
    from vllm_jetspec.head import HeadConfig, random_head, save_head

    target = (make_tiny_qwen3_moe if moe else make_tiny_qwen3)(
        path / "target")
    hc = HeadConfig.for_target(target, num_layers=1, target_layer_ids=[0, 1],
                               block_size=8, intermediate_size=256)
    save_head(random_head(hc, seed=0), hc, path / "head")
    return target, path / "head"


def tiny_qwen3_in_memory(vocab: int = 16, layers: int = 3, seed: int = 0,
                         init: float = 0.3, hidden: int = 64,
                         head_dim: int = 16):
    """An fp32 Qwen3 with a tiny vocabulary and peaked logits (large init),
    so that a random draft head gets tokens accepted by chance. vLLM's
    CPU_ATTN needs head_dim >= 32."""
    import torch
    import transformers

    cfg = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim,
        max_position_embeddings=2048, initializer_range=init,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(cfg).float().eval()
