"""A tree-aware attention backend in plain torch, for vLLM's CPU platform.

vLLM 0.26's ``CPU_ATTN`` keeps K/V in ISA-specific layouts written by C++
and its kernel knows only causal / non-causal attention, so tree
verification cannot reuse it. This backend keeps a plain paged layout
``[num_blocks, 2, block_size, num_kv_heads, head_size]`` and computes every
request with ``vllm_jetspec.kernels.tree_attention_ref.attend_one``: causal
for prefill, chunked prefill and decode, and the packed ancestor mask of
``tree_state`` for requests that verify a tree this step. It is a reference
(Python loop over requests, fp32 math): right for CI's tiny models and for
checking the fast paths, not for speed.

It is installed with ``register_backend(AttentionBackendEnum.CPU_ATTN,
...)``, since ``CpuPlatform.get_attn_backend_cls`` always resolves
``CPU_ATTN``; see ``vllm_jetspec.vllm_patches`` for when.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl,
                                       AttentionMetadataBuilder,
                                       AttentionType, CommonAttentionMetadata,
                                       MultipleOf)

from vllm.logger import init_logger

from ..kernels.tree_attention_ref import attend_one, paged_gather
from . import tree_state

logger = init_logger("vllm.jetspec.torch_attention")


class TorchTreeAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any

    @staticmethod
    def get_name() -> str:
        # vLLM maps the name back to the registry entry this class overrides.
        return "CPU_ATTN"

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type[TorchTreeAttentionImpl]:
        return TorchTreeAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TorchTreeAttentionMetadataBuilder]:
        return TorchTreeAttentionMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int,
                           num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return num_blocks, 2, block_size, num_kv_heads, head_size

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


@dataclass
class TorchTreeAttentionMetadata:
    num_actual_tokens: int
    # [R + 1] int32 (CPU): offsets of each request's tokens in the batch.
    query_start_loc: torch.Tensor
    # [R] int32 (CPU): K/V length per request, this step's tokens included.
    seq_lens: torch.Tensor
    # [R, max_blocks] int32: page ids.
    block_table: torch.Tensor
    # [num_tokens] int64: cache slot of each token (-1: padding).
    slot_mapping: torch.Tensor
    causal: bool
    # request index -> [n, W] int64 packed ancestor rows of its n scheduled
    # tokens, for requests verifying a tree this step.
    tree_masks: dict[int, torch.Tensor]


class TorchTreeAttentionMetadataBuilder(
        AttentionMetadataBuilder[TorchTreeAttentionMetadata]):

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int,
              common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TorchTreeAttentionMetadata:
        m = common_attn_metadata
        causal = m.causal if isinstance(m.causal, bool) else True
        return TorchTreeAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc_cpu,
            seq_lens=m.seq_lens.cpu(),
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
            causal=causal,
            tree_masks=tree_state.masks_for_step(m.num_reqs) if causal
            else {})


class TorchTreeAttentionImpl(AttentionImpl):

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int, alibi_slopes, sliding_window,
                 kv_cache_dtype: str, logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks=None) -> None:
        unsupported = {"alibi": alibi_slopes is not None,
                       "sliding window": sliding_window is not None,
                       "logits soft cap": bool(logits_soft_cap),
                       "attention sinks": sinks is not None,
                       "kv cache dtype " + kv_cache_dtype:
                       kv_cache_dtype != "auto"}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(
                f"jetspec's torch attention backend does not support {bad}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def do_kv_cache_update(self, layer, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        nb, _, bs, h, d = kv_cache.shape
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        ok = slots >= 0
        flat = kv_cache.view(nb, 2, bs * h * d)  # rows of a block: bs x h x d
        blk, off = slots[ok] // bs, slots[ok] % bs
        k = key[:n][ok].reshape(-1, h * d)
        v = value[:n][ok].reshape(-1, h * d)
        idx = off[:, None] * h * d + torch.arange(h * d, device=off.device)
        flat[blk[:, None], 0, idx] = k.to(kv_cache.dtype)
        flat[blk[:, None], 1, idx] = v.to(kv_cache.dtype)

    def write_step_kv(self, layer, key, value, kv_cache, m,
                      output_scale, output_block_scale) -> bool:
        """The part of ``forward`` shared by this backend and the Triton
        one: refuse fused output quantization, write this step's K/V to
        the cache; False when there is nothing to attend (no metadata:
        profiling / warm-up)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization")
        if m is None:
            return False
        if (self.kv_sharing_target_layer_name is None and key is not None
                and value is not None):
            self.do_kv_cache_update(layer, key, value, kv_cache,
                                    m.slot_mapping[:m.num_actual_tokens])
        return True

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: TorchTreeAttentionMetadata | None,
                output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        m = attn_metadata
        if not self.write_step_kv(layer, key, value, kv_cache, m,
                                  output_scale, output_block_scale):
            return output
        logger.info_once("jetspec torch attention backend in use")
        k_cache, v_cache = kv_cache[:, 0], kv_cache[:, 1]
        out = output.view(-1, self.num_heads, self.head_size)
        qsl = m.query_start_loc.tolist()
        for r, seq_len in enumerate(m.seq_lens.tolist()):
            s, e = qsl[r], qsl[r + 1]
            if e == s or seq_len == 0:
                continue
            n = e - s
            k = paged_gather(k_cache, m.block_table, r, seq_len)
            v = paged_gather(v_cache, m.block_table, r, seq_len)
            out[s:e] = attend_one(query[s:e], k, v, seq_len - n,
                                  m.tree_masks.get(r), self.scale,
                                  causal=m.causal)
        return output
