"""Per-step tree masks handed from the model runner to the attention
backend (both run in the same worker process, one step at a time).

V1 runner (``runner.py``): before the target's verify forward the runner
sets the packed ancestor rows of every request that verifies a tree this
step, as host tensors; attention metadata built for that step reads them.
V2 runner (``v2/``): the rows stay on the device, in the drafter's
per-request buffers; the runner hands over where they are
(``DeviceTrees``). Requests not covered attend causally.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_masks: dict[int, torch.Tensor] = {}


@dataclass
class DeviceTrees:
    # [R] int32 device: request-state index of each batch row
    idx_mapping: torch.Tensor
    # [R] bool host: which batch rows verify a tree
    tree_rows: np.ndarray
    # [max_num_reqs, budget, W] int64 device: packed ancestor rows by
    # request-state index
    masks: torch.Tensor


_device: DeviceTrees | None = None


def set_step_masks(masks: dict[int, torch.Tensor]) -> None:
    """request index in the batch -> [n, W] int64 packed ancestor rows of
    its n scheduled tokens."""
    global _masks
    _masks = dict(masks)


def clear() -> None:
    _masks.clear()


def masks_for_step(num_reqs: int) -> dict[int, torch.Tensor]:
    return {r: m for r, m in _masks.items() if r < num_reqs}


def set_device_trees(trees: DeviceTrees | None) -> None:
    global _device
    _device = trees


def device_trees() -> DeviceTrees | None:
    return _device
