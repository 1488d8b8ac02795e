"""Triton K/V moves of a tree round's kept paths, every layer in one launch.

Same semantics as ``kv_move_ref.move_kv_slots_ref``. The torch version
(``vllm_patches.compaction``) costs a gather and a scatter kernel per layer
(72 launches a round for a 36-layer target, ≈ 2-3 µs each on an H200 even
inside a CUDA graph); this one is one launch: program (request, layer, KV
head) loads the request's source rows of that head (K and V), waits at a
barrier, then writes them (a request's destination may be another of its
moves' source). The layers' caches are found through a table of their
addresses (``KVTable``), so they must share shape, strides and dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _move_kv_kernel(
    PTRS, KV0, SRC, DST, L,
    s_b, s_2, s_s, s_h, s_d,
    BLOCK_SIZE: tl.constexpr, LP: tl.constexpr, D: tl.constexpr,
):
    r = tl.program_id(0)
    layer = tl.program_id(1)
    h = tl.program_id(2)
    base = tl.load(PTRS + layer).to(tl.pointer_type(KV0.dtype.element_ty))
    i = tl.arange(0, LP)
    ok = i < L
    src = tl.load(SRC + r * L + i, mask=ok, other=-1)
    dst = tl.load(DST + r * L + i, mask=ok, other=-1)
    mv = ok & (src >= 0) & (dst >= 0)
    src = tl.where(mv, src, 0)
    dst = tl.where(mv, dst, 0)
    d = tl.arange(0, D)
    at_src = (src // BLOCK_SIZE) * s_b + (src % BLOCK_SIZE) * s_s + h * s_h
    at_dst = (dst // BLOCK_SIZE) * s_b + (dst % BLOCK_SIZE) * s_s + h * s_h
    pk = base + at_src[:, None] + d[None, :] * s_d
    k = tl.load(pk, mask=mv[:, None], other=0.0)
    v = tl.load(pk + s_2, mask=mv[:, None], other=0.0)
    # Every read of this (request, layer, head) before any write.
    tl.debug_barrier()
    qk = base + at_dst[:, None] + d[None, :] * s_d
    tl.store(qk, k, mask=mv[:, None])
    tl.store(qk + s_2, v, mask=mv[:, None])


class KVTable:
    """The layers' caches as one address table (built once: a CUDA graph
    replays the table's address)."""

    def __init__(self, kv_caches: list[torch.Tensor]):
        if not kv_caches:
            raise ValueError("no caches")
        first = kv_caches[0]
        for kv in kv_caches:
            if kv.shape != first.shape or kv.stride() != first.stride() \
                    or kv.dtype != first.dtype or kv.device != first.device:
                raise ValueError("the layers' caches differ in shape, "
                                 "strides, dtype or device")
        if first.dim() != 5 or first.shape[1] != 2:
            raise ValueError("caches must be [blocks, 2, block_size, H, D], "
                             f"got {tuple(first.shape)}")
        D = first.shape[4]
        if D & (D - 1):
            raise ValueError(f"head dim {D}: a power of two is supported")
        self.first = first
        self.num_layers = len(kv_caches)
        self.ptrs = torch.tensor([kv.data_ptr() for kv in kv_caches],
                                 dtype=torch.int64, device=first.device)

    @staticmethod
    def supports(kv_caches: list[torch.Tensor]) -> bool:
        try:
            KVTable(kv_caches)
        except ValueError:
            return False
        return True


def move_kv_slots(table: KVTable, src: torch.Tensor,
                  dst: torch.Tensor) -> None:
    """``move_kv_slots_ref`` over the table's caches: ``src``/``dst``
    [R, L] int64 cache slots (-1: no move), in place, one launch."""
    R, L = src.shape
    if dst.shape != src.shape:
        raise ValueError(f"src {tuple(src.shape)} and dst "
                         f"{tuple(dst.shape)} differ")
    if R == 0 or L == 0:
        return
    kv = table.first
    _, _, bs, H, D = kv.shape
    _move_kv_kernel[(R, table.num_layers, H)](
        table.ptrs, kv, src.contiguous(), dst.contiguous(), L,
        *kv.stride(), BLOCK_SIZE=bs, LP=triton.next_power_of_2(L), D=D,
        num_warps=4)
