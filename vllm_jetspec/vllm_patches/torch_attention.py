"""A tree-aware attention backend in plain torch, for vLLM's CPU platform.

vLLM 0.26's ``CPU_ATTN`` keeps K/V in ISA-specific layouts written by C++
and its kernel knows only causal / non-causal attention, so tree
verification cannot reuse it. This backend keeps a plain paged layout
``[num_blocks, 2, block_size, num_kv_heads, head_size]`` and computes every
request with the semantics of
``vllm_jetspec.kernels.tree_attention_ref.attend_one``: causal for prefill,
chunked prefill and decode, and the packed ancestor mask of ``tree_state``
for requests that verify a tree this step (a test checks it against that
reference). What the layers of a step share (the K/V write indices, each
request's pages and its mask) is planned once per step, at the first layer
(``StepPlan``); per layer and request it is then one page gather and two
batched matmuls, with the query heads that share a K/V head stacked (no
K/V repeat). A Python loop over requests: meant for vLLM's CPU platform
(and CI), where the engine runs eagerly.

It is installed with ``register_backend(AttentionBackendEnum.CPU_ATTN,
...)``, since ``CpuPlatform.get_attn_backend_cls`` always resolves
``CPU_ATTN``; see ``vllm_jetspec.vllm_patches`` for when.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl,
                                       AttentionMetadataBuilder,
                                       AttentionType, CommonAttentionMetadata,
                                       MultipleOf)

from vllm.logger import init_logger

from ..kernels.tree_attention_ref import _unpack_rows
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
class RequestPlan:
    start: int                  # its first token in the batch
    end: int
    seq_len: int                # K/V length, this step's tokens included
    pages: torch.Tensor         # [ceil(seq_len / block_size)] int64
    # [n, seq_len] bool, True = may attend; None = every key (a single
    # causal token, or a non-causal step).
    allowed: torch.Tensor | None


@dataclass
class StepPlan:
    """What every layer of a step shares, computed at its first layer."""
    # K/V write: batch rows with a cache slot, and that slot's page/offset.
    write_rows: torch.Tensor
    write_pages: torch.Tensor
    write_offsets: torch.Tensor
    requests: list[RequestPlan]


def plan_step(m: "TorchTreeAttentionMetadata", block_size: int,
              device) -> StepPlan:
    slots = m.slot_mapping[:m.num_actual_tokens].long()
    ok = slots >= 0
    rows = torch.arange(slots.shape[0], device=slots.device)[ok]
    good = slots[ok]
    qsl = m.query_start_loc.tolist()
    reqs = []
    for r, seq_len in enumerate(m.seq_lens.tolist()):
        s, e = qsl[r], qsl[r + 1]
        n = e - s
        if n == 0 or seq_len == 0:
            continue
        prefix = seq_len - n
        pages = m.block_table[r, :(seq_len + block_size - 1) // block_size]
        words = m.tree_masks.get(r)
        if words is not None:
            allowed = torch.ones(n, seq_len, dtype=torch.bool, device=device)
            allowed[:, prefix:] = _unpack_rows(words.to(device), n)
        elif m.causal and n > 1:
            i = torch.arange(n, device=device)[:, None]
            j = torch.arange(seq_len, device=device)[None, :]
            allowed = j <= prefix + i
        else:
            allowed = None
        reqs.append(RequestPlan(s, e, seq_len, pages.long().to(device),
                                allowed))
    return StepPlan(rows.to(device), (good // block_size).to(device),
                    (good % block_size).to(device), reqs)


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
    # Filled by the step's first layer (``plan_step``).
    plan: StepPlan | None = field(default=None, repr=False)

    def step_plan(self, block_size: int, device) -> StepPlan:
        if self.plan is None:
            self.plan = plan_step(self, block_size, device)
        return self.plan


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
        self._announced = False

    def do_kv_cache_update(self, layer, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        bs = kv_cache.shape[2]
        slots = slot_mapping.long()
        ok = slots >= 0
        n = slot_mapping.shape[0]
        self._write(kv_cache, key[:n][ok], value[:n][ok], slots[ok] // bs,
                    slots[ok] % bs)

    @staticmethod
    def _write(kv_cache, key, value, pages, offsets) -> None:
        """key/value [m, H, D] to (page, offset) of the paged cache."""
        kv_cache[pages, 0, offsets] = key.to(kv_cache.dtype)
        kv_cache[pages, 1, offsets] = value.to(kv_cache.dtype)

    def write_step_kv(self, layer, key, value, kv_cache, m,
                      output_scale, output_block_scale) -> bool:
        """The Triton backend's first part of ``forward`` (this backend's
        own forward writes through its step plan instead): refuse fused
        output quantization, write this step's K/V to the cache; False when
        there is nothing to attend (no metadata: profiling / warm-up)."""
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
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization")
        if m is None:
            return output
        plan = m.step_plan(kv_cache.shape[2], kv_cache.device)
        if (self.kv_sharing_target_layer_name is None and key is not None
                and value is not None):
            w = plan.write_rows
            self._write(kv_cache, key[w], value[w], plan.write_pages,
                        plan.write_offsets)
        if not self._announced:
            logger.info_once("jetspec torch attention backend in use")
            self._announced = True
        out = output.view(-1, self.num_heads, self.head_size)
        for rp in plan.requests:
            out[rp.start:rp.end] = self._attend(
                query[rp.start:rp.end].view(-1, self.num_heads,
                                            self.head_size),
                kv_cache, rp)
        return output

    def _attend(self, q: torch.Tensor, kv_cache: torch.Tensor,
                rp: RequestPlan) -> torch.Tensor:
        """One request: q [n, Hq, D] -> [n, Hq, D]; the math of
        ``attend_one`` (fp32 softmax) with the Hq / Hkv query heads of a
        K/V head stacked into one matmul."""
        n, Hq, D = q.shape
        H = self.num_kv_heads
        g = Hq // H
        L = rp.seq_len
        kv = kv_cache.index_select(0, rp.pages)      # [P, 2, bs, H, D]
        cdt = torch.float32 if q.dtype != torch.float64 else q.dtype
        k = kv[:, 0].reshape(-1, H, D)[:L].to(cdt).permute(1, 2, 0)
        v = kv[:, 1].reshape(-1, H, D)[:L].to(cdt).transpose(0, 1)
        qg = q.to(cdt).view(n, H, g, D).permute(1, 2, 0, 3).reshape(
            H, g * n, D)
        scores = torch.bmm(qg, k).mul_(self.scale).view(H, g, n, L)
        if rp.allowed is not None:
            scores.masked_fill_(~rp.allowed, float("-inf"))
        p = scores.softmax(-1).view(H, g * n, L)
        o = torch.bmm(p, v).view(H, g, n, D)
        return o.permute(2, 0, 1, 3).reshape(n, Hq, D).to(q.dtype)
