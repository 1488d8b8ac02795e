"""Write config-only model directories for timing with ``load_format="dummy"``:
a Qwen3-8B-shaped target and a 5-layer DFlash-format head for it (block 16).

    python scripts/gpu/shapes.py OUT_DIR     # OUT_DIR/qwen3-8b, OUT_DIR/head-8b

Random weights: right for round cost, meaningless for acceptance (use the
bench's --replay). The shapes are Qwen3-8B's published config.
"""

from __future__ import annotations

import json
import os
import sys

QWEN3_8B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3",
    vocab_size=151936, hidden_size=4096, intermediate_size=12288,
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
    rope_theta=1000000, hidden_act="silu", attention_bias=False,
    tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=151643,
    eos_token_id=151645)


def main(out: str) -> None:
    from vllm_jetspec.head import HeadConfig

    target = os.path.join(out, "qwen3-8b")
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(QWEN3_8B, f, indent=1)
    hc = HeadConfig.for_target(QWEN3_8B, num_layers=5,
                               target_layer_ids=[1, 9, 17, 25, 33],
                               block_size=16)
    head = os.path.join(out, "head-8b")
    os.makedirs(head, exist_ok=True)
    with open(os.path.join(head, "config.json"), "w") as f:
        json.dump(hc.to_dict(), f, indent=1)
    print(target, head)


if __name__ == "__main__":
    main(sys.argv[1])
