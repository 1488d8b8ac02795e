"""The Triton K/V move kernel equals its torch reference: chains of moves
inside a request (a destination that is another move's source), requests
side by side, no-op entries, several layers, strided [blocks, 2, ...]
caches. In Triton's interpreter without a GPU (fp32); bf16 too on a GPU."""

from __future__ import annotations

import pytest
import torch

from vllm_jetspec.kernels.kv_move import KVTable, move_kv_slots
from vllm_jetspec.kernels.kv_move_ref import move_kv_slots_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else [])
pytestmark = pytest.mark.independent


def _caches(layers, blocks, bs, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(blocks, 2, bs, H, D, generator=g).to(DEV, dtype)
            for _ in range(layers)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype):
    bs = 16
    caches = _caches(3, 12, bs, 2, 32, dtype, 0)
    # Request 0: its nodes at slots 40.. (block 2); kept path = nodes
    # 0, 2, 5, 6 -> moves 2->1, 5->2, 6->3: slot 42 is read (move 1) and
    # written (move 2). Request 1: nodes at slots 100.. (blocks 6, 7:
    # across a page); path 0, 1, 3 -> only 3->2 moves. Request 2: no move.
    src = torch.tensor([[42, 45, 46, -1], [-1, 115, -1, -1],
                        [-1, -1, -1, -1]])
    dst = torch.tensor([[41, 42, 43, -1], [-1, 114, -1, -1],
                        [-1, -1, -1, -1]])
    want = [c.clone() for c in caches]
    move_kv_slots_ref(want, src, dst)
    move_kv_slots(KVTable(caches), src.to(DEV), dst.to(DEV))
    for got, w in zip(caches, want):
        assert torch.equal(got, w)
    # The chain really moved: slot 42 holds what slot 45 held.
    ref0 = _caches(3, 12, bs, 2, 32, dtype, 0)[0]
    assert torch.equal(caches[0][2, :, 10], ref0[2, :, 13])
    assert torch.equal(caches[0][2, :, 9], ref0[2, :, 10])


def test_random_paths_match_reference():
    """Random kept paths of 16-node trees for 5 requests (each a node
    subset increasing with depth, as acceptance makes them)."""
    g = torch.Generator().manual_seed(3)
    bs, L = 16, 8
    caches = _caches(2, 40, bs, 4, 16, torch.float32, 1)
    src = torch.full((5, L), -1, dtype=torch.long)
    dst = torch.full((5, L), -1, dtype=torch.long)
    for r in range(5):
        base = 100 * r + int(torch.randint(0, 40, (1,), generator=g))
        nodes = sorted(torch.randperm(15, generator=g)[:int(
            torch.randint(0, L, (1,), generator=g))].add(1).tolist())
        for depth, node in enumerate(nodes, 1):
            if node != depth:
                src[r, depth - 1] = base + node
                dst[r, depth - 1] = base + depth
    want = [c.clone() for c in caches]
    move_kv_slots_ref(want, src, dst)
    move_kv_slots(KVTable(caches), src.to(DEV), dst.to(DEV))
    for got, w in zip(caches, want):
        assert torch.equal(got, w)


def test_table_refuses_mixed_caches():
    a = _caches(1, 4, 16, 2, 32, torch.float32, 0)[0]
    b = _caches(1, 5, 16, 2, 32, torch.float32, 0)[0]
    assert not KVTable.supports([a, b])
    assert not KVTable.supports([a[:, 0]])
    assert KVTable.supports([a, a.clone()])
    with pytest.raises(ValueError, match="differ"):
        KVTable([a, b])
