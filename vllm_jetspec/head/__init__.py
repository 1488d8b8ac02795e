"""Trainable causal DFlash-format draft head (the JetSpec head format).

Plain torch; no vLLM import. ``model.py`` documents how vLLM 0.26 computes a
block, which this implementation reproduces.
"""

from .config import HeadConfig
from .io import expected_shapes, load_head, random_head, save_head
from .model import (DFlashHead, block_labels, capture_target_features,
                    collect_target_features, embed, lm_logits)

__all__ = [
    "DFlashHead",
    "HeadConfig",
    "block_labels",
    "capture_target_features",
    "collect_target_features",
    "embed",
    "expected_shapes",
    "lm_logits",
    "load_head",
    "random_head",
    "save_head",
]
