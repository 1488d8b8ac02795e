"""Save/load DFlash heads in the checkpoint layout vLLM 0.26 loads.

A head directory holds ``config.json`` (``HeadConfig.to_dict``) and
``model.safetensors`` with exactly the names
``DFlashQwen3ForCausalLM.load_weights`` expects (it prefixes ``model.``;
``q/k/v_proj`` and ``gate/up_proj`` are stacked into ``qkv_proj`` /
``gate_up_proj`` by ``DFlashQwen3Model.hf_to_vllm_mapper``):

    fc.weight                                  [hidden, hidden * n_target_layers]
    hidden_norm.weight, norm.weight            [hidden]
    layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.self_attn.{q,k}_norm.weight     [head_dim]
    layers.{i}.mlp.{gate,up,down}_proj.weight
    layers.{i}.input_layernorm.weight, layers.{i}.post_attention_layernorm.weight

No ``embed_tokens`` / ``lm_head``: vLLM then shares the target's
(``_maybe_share_embeddings`` / ``_maybe_share_lm_head``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import CONFIG_NAME, HeadConfig
from .model import DFlashHead

WEIGHTS_NAME = "model.safetensors"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                torch.float16: "float16"}


def expected_shapes(config: HeadConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor name with its shape."""
    with torch.device("meta"):
        head = DFlashHead(config)
    return {k: tuple(v.shape) for k, v in head.state_dict().items()}


def random_head(config: HeadConfig, seed: int = 0, std: float = 0.02,
                norm_noise: float = 0.1) -> DFlashHead:
    """A head with deterministic random weights (fp32, CPU)."""
    return DFlashHead(config).init_random(seed, std=std, norm_noise=norm_noise)


def save_head(model: DFlashHead, config: HeadConfig | None,
              directory: str | os.PathLike,
              dtype: torch.dtype | None = None) -> str:
    """Write ``config.json`` + ``model.safetensors`` to ``directory``.

    ``dtype`` casts the saved tensors (default: as they are); the config's
    ``dtype`` records it. Returns the directory.
    """
    config = config or model.config
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = model.state_dict()
    want = expected_shapes(config)
    if set(state) != set(want):
        raise ValueError(
            f"model does not have the DFlash checkpoint layout: missing "
            f"{sorted(set(want) - set(state))}, unexpected "
            f"{sorted(set(state) - set(want))}")
    tensors = {}
    for name, t in state.items():
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match "
                             f"the config ({want[name]})")
        t = t.detach().to("cpu")
        if dtype is not None:
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    saved = {t.dtype for t in tensors.values()}
    dtype_name = _DTYPE_NAMES.get(saved.pop()) if len(saved) == 1 else None
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME),
              metadata={"format": "pt"})
    config.to_json(directory, dtype=dtype_name)
    return directory


def load_head(directory: str | os.PathLike, device: Any = "cpu",
              dtype: torch.dtype | None = None,
              target_config: Any = None) -> DFlashHead:
    """Load a head saved by ``save_head`` (or any causal DFlash checkpoint
    with the same names). ``dtype`` defaults to the stored dtype.

    ``target_config`` (a transformers config, dict or model directory) is
    checked first: a head of another hidden size / vocabulary, or one reading
    layers the target lacks, raises ``ValueError`` before any tensor is read.
    """
    directory = os.fspath(directory)
    config = HeadConfig.from_json(os.path.join(directory, CONFIG_NAME))
    if target_config is not None:
        config.check_target(target_config)
    if os.path.exists(os.path.join(directory, "mask_embedding.pt")):
        # vLLM would substitute it for embed_tokens[mask_token_id].
        raise ValueError(f"{directory}: separate mask_embedding.pt is not "
                         f"supported; mask slots use the target's embedding")
    want = expected_shapes(config)
    index = os.path.join(directory, WEIGHTS_NAME + ".index.json")
    if os.path.exists(index):          # sharded checkpoint
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [WEIGHTS_NAME]
    state = {}
    for file in files:
        path = os.path.join(directory, file)
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in want:
                    # e.g. the target's embed_tokens/lm_head: vLLM would use
                    # that copy instead of the target's. Refuse, not drop.
                    raise ValueError(
                        f"{path}: unexpected tensor {name!r}: not part of the "
                        f"DFlash head layout")
                t = f.get_tensor(name)
                if tuple(t.shape) != want[name]:
                    raise ValueError(
                        f"{path}: {name} has shape {tuple(t.shape)}, "
                        f"config.json implies {want[name]} (hidden_size "
                        f"{config.hidden_size}, "
                        f"{len(config.target_layer_ids)} target layers)")
                state[name] = t
    missing = sorted(set(want) - set(state))
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks {missing}")
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    model = DFlashHead(config).to(dtype=dtype)
    model.load_state_dict(state, strict=True)
    return model.to(device)
