"""Per-step tree masks handed from the model runner to the attention
backend (both run in the same worker process, one step at a time).

The runner sets, before the target's verify forward, the packed ancestor
rows of every request that verifies a tree this step; attention metadata
built for that step reads them. Requests not in the map attend causally.
"""

from __future__ import annotations

import torch

_masks: dict[int, torch.Tensor] = {}


def set_step_masks(masks: dict[int, torch.Tensor]) -> None:
    """request index in the batch -> [n, W] int64 packed ancestor rows of
    its n scheduled tokens."""
    global _masks
    _masks = dict(masks)


def clear() -> None:
    _masks.clear()


def masks_for_step(num_reqs: int) -> dict[int, torch.Tensor]:
    return {r: m for r, m in _masks.items() if r < num_reqs}

