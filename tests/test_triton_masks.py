"""The packed masks the Triton attention backend builds per step
(vllm_patches.triton_attention): causal chains, non-causal blocks and tree
rows, against explicit boolean masks."""

from __future__ import annotations

import pytest
import torch

from vllm_jetspec.kernels.tree_attention_ref import _unpack_rows
from vllm_jetspec.tree import build_tree, packed_ancestor_mask
from vllm_jetspec.vllm_patches.triton_attention import (chain_words,
                                                        step_masks_device,
                                                        step_masks_host)


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
    m = step_masks_host(qsl, True, {2: rows})
    assert m.shape == (4, 70, 2)
    for r, n in enumerate((70, 1, 20, 3)):
        want = torch.ones(n, n, dtype=torch.bool).tril() if r != 2 \
            else _unpack_rows(rows, 20)
        assert torch.equal(_unpack_rows(m[r, :n], n), want), r
    # Not causal (the drafter's block): each row sees all of its request.
    m = step_masks_host(qsl, False, {})
    for r, n in enumerate((70, 1, 20, 3)):
        assert _unpack_rows(m[r, :n], n).all(), r
        assert not _unpack_rows(m[r, :n], 70)[:, n:].any(), r


def test_step_masks_on_the_device_equal_the_hosts():
    """Steps without host trees (V2; prefill and plain steps) make their
    chain masks on the device from one stored chain: the same words as
    the host's masks, causal or not, for prefill chunks longer than a
    word, requests without tokens, from a chain wider than the step, and
    into a view of a larger buffer (the builder's)."""
    g = torch.Generator().manual_seed(1)
    wide = chain_words(512, 8, "cpu")
    for lens in ([70, 1, 20, 3], [1], [0, 5, 0], [300, 16, 16, 16, 129],
                 [64, 65, 128], [0]):
        qsl = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
        for causal in (True, False):
            want = step_masks_host(qsl, causal, {})
            R, n, w = want.shape
            got = step_masks_device(wide, qsl, causal, n, w)
            assert torch.equal(got, want), (lens, causal)
            buf = torch.randint(-9, 9, (R + 2, n + 5, w + 3), generator=g)
            step_masks_device(wide, qsl, causal, n, w,
                              out=buf[:R, :n, :w])
            assert torch.equal(buf[:R, :n, :w], want), (lens, causal)


def test_tree_splits_setting():
    """JETSPEC_TREE_SPLITS: 'auto' (prefix splits from the grid size) on
    CUDA and 1 elsewhere (Triton's interpreter), unless set to an integer
    >= 1 (1: the single-pass kernel) or 'auto'; anything else is one clear
    error."""
    from vllm_jetspec.vllm_patches.triton_attention import splits_setting

    assert splits_setting({}) == "auto"
    assert splits_setting({}, cuda=False) == 1
    assert splits_setting({"JETSPEC_TREE_SPLITS": "auto"},
                          cuda=False) == "auto"
    assert splits_setting({"JETSPEC_TREE_SPLITS": "1"}) == 1
    assert splits_setting({"JETSPEC_TREE_SPLITS": "4"}) == 4
    assert splits_setting({"JETSPEC_TREE_SPLITS": "auto"}) == "auto"
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match="JETSPEC_TREE_SPLITS"):
            splits_setting({"JETSPEC_TREE_SPLITS": bad})


def test_tree_tiles_setting():
    """JETSPEC_TREE_TILES: large (default) or small; else one clear error."""
    from vllm_jetspec.vllm_patches.triton_attention import tiles_setting

    assert tiles_setting({}) is True
    assert tiles_setting({"JETSPEC_TREE_TILES": "large"}) is True
    assert tiles_setting({"JETSPEC_TREE_TILES": "small"}) is False
    with pytest.raises(ValueError, match="JETSPEC_TREE_TILES"):
        tiles_setting({"JETSPEC_TREE_TILES": "huge"})


def test_env_choice_names_the_variable_and_its_choices():
    """The switches' shared reader: default when unset, the value stripped,
    anything else one error naming the variable and every choice."""
    from vllm_jetspec.vllm_patches.config import env_choice

    assert env_choice("X", ("a", "b"), "a", {}) == "a"
    assert env_choice("X", ("a", "b"), "a", {"X": " b "}) == "b"
    with pytest.raises(ValueError,
                       match=r"jetspec: X must be 'a' or 'b' or 'c', got 'd'"):
        env_choice("X", ("a", "b", "c"), "a", {"X": "d"})


def test_tree_precision_setting():
    """JETSPEC_TREE_PRECISION: ieee (default) or tf32; else one error."""
    from vllm_jetspec.vllm_patches.triton_attention import precision_setting

    assert precision_setting({}) == "ieee"
    assert precision_setting({"JETSPEC_TREE_PRECISION": "tf32"}) == "tf32"
    with pytest.raises(ValueError, match="JETSPEC_TREE_PRECISION"):
        precision_setting({"JETSPEC_TREE_PRECISION": "bf16"})


def _builder(budget=20, max_num_seqs=4):
    from types import SimpleNamespace as NS

    from vllm_jetspec.vllm_patches.triton_attention import \
        TritonTreeAttentionMetadataBuilder
    cfg = NS(speculative_config=NS(num_speculative_tokens=budget - 1),
             scheduler_config=NS(max_num_seqs=max_num_seqs),
             model_config=NS(max_model_len=1000))
    return TritonTreeAttentionMetadataBuilder(None, [], cfg,
                                              torch.device("cpu"))


def _common(n, prefix, causal=True):
    """vLLM's CommonAttentionMetadata of a step, the fields the tree
    builder reads: requests of ``n`` new tokens over ``prefix`` cached
    (also used by tests/test_v2_round.py)."""
    from types import SimpleNamespace as NS
    qsl = torch.tensor([0] + n).cumsum(0).to(torch.int32)
    seq = (torch.tensor(prefix) + torch.tensor(n)).to(torch.int32)
    return NS(num_reqs=len(n), causal=causal, query_start_loc_cpu=qsl,
              query_start_loc=qsl.clone(), seq_lens=seq,
              block_table_tensor=torch.zeros(len(n), 8, dtype=torch.int32),
              slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.long),
              num_actual_tokens=int(qsl[-1]), max_seq_len=int(seq.max()))


def test_builder_makes_chain_masks_on_the_device(monkeypatch):
    """Without host trees (V2 steps, prefills, plain steps) the builder's
    masks come from its stored chain, grown for a longer prefill chunk
    (300 tokens over a budget of 20): the host's masks, causal or not,
    none built on the host."""
    from vllm_jetspec.vllm_patches import triton_attention

    def no_host(*a):
        raise AssertionError("masks built on the host")

    b = _builder()
    cases = []
    for n, causal in (([300, 1, 4], True), ([20, 3], True),
                      ([300, 2], False), ([5, 5, 1], False)):
        c = _common(n, [4] * len(n), causal=causal)
        cases.append((c, causal, step_masks_host(c.query_start_loc_cpu,
                                                 causal, {})))
    monkeypatch.setattr(triton_attention, "step_masks_host", no_host)
    for c, causal, want in cases:
        m = b.build(0, c)
        R, nn, ww = want.shape
        assert torch.equal(m.masks[:R, :nn, :ww], want), causal
    assert b.chain.shape == (512, 8)


def test_builder_writes_masks_and_prefixes_in_place():
    """Full CUDA graphs replay the kernel arguments of their capture: every
    step that fits the builder's buffers ([max_num_seqs, budget, W]) gets
    its masks and prefix lengths written in place (same storage each step,
    the capture's strides), with the step's content; a step that does not
    fit (here a 70-token prefill, budget 20) gets fresh tensors."""
    from vllm_jetspec.vllm_patches import tree_state

    g = torch.Generator().manual_seed(1)
    logp = torch.randn(1, 8, 50, generator=g).log_softmax(-1)
    v, i = logp.topk(5, dim=-1)
    tree = build_tree(v, i, torch.zeros(1, dtype=torch.long), 20,
                      algo="accum_logp", width=5)
    rows = packed_ancestor_mask(tree)[0]
    b = _builder()
    seen = set()
    for n, prefix, trees in (([20, 20], [7, 30], {1: rows}),
                             ([20, 20, 20], [9, 3, 40], {0: rows}),
                             ([20, 1, 5], [0, 11, 2], {})):
        tree_state.set_step_masks(trees)
        try:
            m = b.build(0, _common(n, prefix))
        finally:
            tree_state.clear()
        assert m.masks.data_ptr() == b.masks_buf.data_ptr()
        assert m.masks.stride() == b.masks_buf.stride()
        assert m.prefix_lens.data_ptr() == b.prefix_buf.data_ptr()
        assert m.prefix_lens.tolist() == prefix
        # The query offsets too (a DFlash draft pass makes a new tensor of
        # them each step): the draft pass's graphs rely on graph_safe.
        assert m.query_start_loc.data_ptr() == b.qsl_buf.data_ptr()
        assert m.query_start_loc.tolist() == [0] + torch.tensor(
            n).cumsum(0).tolist()
        assert m.graph_safe
        assert m.max_nodes == max(n)
        # The prefix bound the kernel sizes its splits from: the model's
        # length in a step a graph may replay.
        assert m.max_seq_len == 1000
        for r, nr in enumerate(n):
            want = _unpack_rows(trees[r], nr) if r in trees else \
                torch.ones(nr, nr, dtype=torch.bool).tril()
            assert torch.equal(_unpack_rows(m.masks[r, :nr], nr), want)
        seen.add(m.masks.data_ptr())
    assert len(seen) == 1
    # vLLM's CUDA-graph memory profile warms up with sequence lengths
    # shorter than the queries: the prefix is 0, never negative.
    short = _common([20, 20], [0, 0])
    short.seq_lens = torch.tensor([16, 3], dtype=torch.int32)
    assert b.build(0, short).prefix_lens.tolist() == [0, 0]
    m = b.build(0, _common([70, 3], [0, 5]))
    assert m.masks.data_ptr() != b.masks_buf.data_ptr()
    assert not m.graph_safe and m.causal
    assert m.max_seq_len == 70        # vLLM's, of the step
    # A non-causal DFlash head's draft pass: vLLM asserts causal is False.
    assert b.build(0, _common([4, 4], [3, 9], causal=False)).causal is False
    assert m.prefix_lens.tolist() == [0, 5] and m.max_nodes == 70
    short = _common([70, 3], [0, 0])
    short.seq_lens = torch.tensor([16, 3], dtype=torch.int32)
    assert b.build(0, short).prefix_lens.tolist() == [0, 0]
    assert torch.equal(_unpack_rows(m.masks[0, :70], 70),
                       torch.ones(70, 70, dtype=torch.bool).tril())


def test_full_graph_support_declared_only_where_it_holds(monkeypatch):
    """UNIFORM_BATCH (vLLM keeps FULL_AND_PIECEWISE: full graphs for
    verify steps of exactly budget tokens a request) on CUDA with the
    tree kernel, prefix splits or not (their launch is sized from the
    model's length); NEVER on CPU or with JETSPEC_FULL_GRAPHS=0; a bad
    value is one clear error."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_jetspec.vllm_patches.triton_attention import (
        TritonTreeAttentionMetadataBuilder as B, full_graphs_setting)

    for k in ("JETSPEC_FULL_GRAPHS", "JETSPEC_TREE_SPLITS"):
        monkeypatch.delenv(k, raising=False)
    assert B.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
    monkeypatch.setattr(type(current_platform), "is_cuda",
                        lambda self: True)
    assert B.get_cudagraph_support(None, None) == \
        AttentionCGSupport.UNIFORM_BATCH
    monkeypatch.setenv("JETSPEC_TREE_SPLITS", "4")
    assert B.get_cudagraph_support(None, None) == \
        AttentionCGSupport.UNIFORM_BATCH
    monkeypatch.setenv("JETSPEC_TREE_SPLITS", "0")
    with pytest.raises(ValueError, match="JETSPEC_TREE_SPLITS"):
        B.get_cudagraph_support(None, None)
    monkeypatch.delenv("JETSPEC_TREE_SPLITS")
    monkeypatch.setenv("JETSPEC_FULL_GRAPHS", "0")
    assert B.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
    with pytest.raises(ValueError, match="JETSPEC_FULL_GRAPHS"):
        full_graphs_setting({"JETSPEC_FULL_GRAPHS": "yes"})
