"""The packed masks the Triton attention backend builds per step
(vllm_patches.triton_attention): causal chains, non-causal blocks and tree
rows, against explicit boolean masks."""

from __future__ import annotations

import pytest
import torch

from vllm_jetspec.kernels.tree_attention_ref import _unpack_rows
from vllm_jetspec.tree import build_tree, packed_ancestor_mask
from vllm_jetspec.vllm_patches.triton_attention import (chain_words,
                                                        step_masks)


def test_chain_words_are_causal_rows():
    for n in (1, 5, 63, 64, 65, 128, 130, 300):
        words = chain_words(n, (n + 63) // 64, "cpu")
        assert torch.equal(_unpack_rows(words, n),
                           torch.ones(n, n, dtype=torch.bool).tril())


def test_step_masks_mix_chains_blocks_and_trees():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(1, 8, 50, generator=g).log_softmax(-1)
    v, i = logp.topk(5, dim=-1)
    tree = build_tree(v, i, torch.zeros(1, dtype=torch.long), 20,
                      algo="accum_logp", width=5)
    rows = packed_ancestor_mask(tree)[0]                 # [20, 1]
    qsl = torch.tensor([0, 70, 71, 91, 94])              # n = 70, 1, 20, 3
    m = step_masks(qsl, True, {2: rows}, "cpu")
    assert m.shape == (4, 70, 2)
    for r, n in enumerate((70, 1, 20, 3)):
        want = torch.ones(n, n, dtype=torch.bool).tril() if r != 2 \
            else _unpack_rows(rows, 20)
        assert torch.equal(_unpack_rows(m[r, :n], n), want), r
    # Not causal (the drafter's block): each row sees all of its request.
    m = step_masks(qsl, False, {}, "cpu")
    for r, n in enumerate((70, 1, 20, 3)):
        assert _unpack_rows(m[r, :n], n).all(), r
        assert not _unpack_rows(m[r, :n], 70)[:, n:].any(), r


def test_tree_splits_setting():
    """JETSPEC_TREE_SPLITS: 1 (the single-pass kernel) unless set to an
    integer >= 1 or 'auto'; anything else is one clear error."""
    from vllm_jetspec.vllm_patches.triton_attention import splits_setting

    assert splits_setting({}) == 1
    assert splits_setting({"JETSPEC_TREE_SPLITS": "4"}) == 4
    assert splits_setting({"JETSPEC_TREE_SPLITS": "auto"}) == "auto"
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match="JETSPEC_TREE_SPLITS"):
            splits_setting({"JETSPEC_TREE_SPLITS": bad})


def test_tree_tiles_setting():
    """JETSPEC_TREE_TILES: small (default) or large; else one clear error."""
    from vllm_jetspec.vllm_patches.triton_attention import tiles_setting

    assert tiles_setting({}) is False
    assert tiles_setting({"JETSPEC_TREE_TILES": "large"}) is True
    assert tiles_setting({"JETSPEC_TREE_TILES": "small"}) is False
    with pytest.raises(ValueError, match="JETSPEC_TREE_TILES"):
        tiles_setting({"JETSPEC_TREE_TILES": "huge"})
