"""The masks the Triton attention backend's builder writes per step
(vllm_patches.triton_attention): tree rows and tree flags (chains are
computed by the kernel), against explicit boolean masks."""

from __future__ import annotations

import pytest
import torch

from vllm_jetspec.kernels.tree_attention_ref import _unpack_rows
from vllm_jetspec.tree import build_tree, packed_ancestor_mask
from vllm_jetspec.vllm_patches.triton_attention import step_masks_host


def effective_rows(m, r: int, n: int) -> torch.Tensor:
    """[n, n] bool: what request r's n new tokens may see of each other
    under the metadata ``m`` -- its tree rows where flagged, else the
    chain the kernel computes (causal, or all of them when not causal)."""
    if int(m.tree_rows[r]):
        return _unpack_rows(m.masks[r, :n], n)
    full = torch.ones(n, n, dtype=torch.bool)
    return full.tril() if m.causal else full


def test_step_masks_host_hold_tree_rows_and_flags_only():
    """The V1 hooks' host trees: each tree's rows at its request, flag 1;
    the other requests (a 70-token prefill, a decode step) flag 0 and
    zero rows -- the kernel computes their chains -- so the tensor is as
    wide as the widest tree, not the step's longest chunk."""
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(1, 8, 50, generator=g).log_softmax(-1)
    v, i = logp.topk(5, dim=-1)
    tree = build_tree(v, i, torch.zeros(1, dtype=torch.long), 20,
                      algo="accum_logp", width=5)
    rows = packed_ancestor_mask(tree)[0]                 # [20, 1]
    m, flags = step_masks_host(4, {2: rows})             # n = 70, 1, 20, 3
    assert m.shape == (4, 20, 1) and flags.tolist() == [0, 0, 1, 0]
    assert torch.equal(m[2], rows) and not m[[0, 1, 3]].any()
    m, flags = step_masks_host(3, {})
    assert m.shape == (3, 1, 1) and not m.any() and not flags.any()


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


def test_builder_writes_no_chain_rows():
    """Steps without trees (V2 steps beside no tree, prefills, plain steps,
    the draft pass) write flags 0 and no mask row: the buffer keeps its
    budget's shape and content whatever the chunk (300 tokens over a
    budget of 20), and the kernel computes each chain, causal or not."""
    b = _builder()
    shape = b.masks_buf.shape
    b.masks_buf.fill_(5)
    for n, causal in (([300, 1, 4], True), ([20, 3], True),
                      ([300, 2], False), ([5, 5, 1], False)):
        b.tree_buf.fill_(7)
        m = b.build(0, _common(n, [4] * len(n), causal=causal))
        assert m.tree_rows.tolist() == [0] * len(n)
        assert m.tree_rows.data_ptr() == b.tree_buf.data_ptr()
        assert m.masks.data_ptr() == b.masks_buf.data_ptr()
        assert m.causal is causal and m.max_nodes == max(n)
        for r, nr in enumerate(n):
            full = torch.ones(nr, nr, dtype=torch.bool)
            assert torch.equal(effective_rows(m, r, nr),
                               full.tril() if causal else full)
    assert b.masks_buf.shape == shape and (b.masks_buf == 5).all()


def test_builder_writes_masks_and_prefixes_in_place():
    """Full CUDA graphs replay the kernel arguments of their capture: every
    step gets its tree rows, tree flags, prefix lengths and query starts
    written in place (same storage each step, the capture's strides), with
    the step's content -- a step longer than the budget too (a 70-token
    prefill, budget 20), which has no rows to write; its launch is sized
    from the step (``graph_safe`` False: no graph replays it)."""
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
                             ([20, 1, 5], [0, 11, 2], {}),
                             ([70, 20], [0, 5], {1: rows})):
        tree_state.set_step_masks(trees)
        try:
            m = b.build(0, _common(n, prefix))
        finally:
            tree_state.clear()
        for t, buf in ((m.masks, b.masks_buf), (m.tree_rows, b.tree_buf),
                       (m.prefix_lens, b.prefix_buf),
                       (m.query_start_loc, b.qsl_buf)):
            assert t.data_ptr() == buf.data_ptr()
            assert t.stride() == buf.stride()
        assert m.prefix_lens.tolist() == prefix
        # The query offsets too (a DFlash draft pass makes a new tensor of
        # them each step): the draft pass's graphs rely on graph_safe.
        assert m.query_start_loc.tolist() == [0] + torch.tensor(
            n).cumsum(0).tolist()
        assert m.tree_rows.tolist() == [int(r in trees)
                                        for r in range(len(n))]
        assert m.max_nodes == max(n)
        # The prefix bound the kernel sizes its splits from: the model's
        # length in a step a graph may replay, else vLLM's of the step.
        assert m.graph_safe is (max(n) <= 20)
        assert m.max_seq_len == (1000 if max(n) <= 20 else 70)
        for r, nr in enumerate(n):
            want = _unpack_rows(trees[r], nr) if r in trees else \
                torch.ones(nr, nr, dtype=torch.bool).tril()
            assert torch.equal(effective_rows(m, r, nr), want)
        seen.add(m.masks.data_ptr())
    assert len(seen) == 1
    # vLLM's CUDA-graph memory profile warms up with sequence lengths
    # shorter than the queries: the prefix is 0, never negative.
    for n in ([20, 20], [70, 3]):
        short = _common(n, [0, 0])
        short.seq_lens = torch.tensor([16, 3], dtype=torch.int32)
        assert b.build(0, short).prefix_lens.tolist() == [0, 0]
    # A non-causal DFlash head's draft pass: vLLM asserts causal is False.
    assert b.build(0, _common([4, 4], [3, 9], causal=False)).causal is False
    # More requests than max_num_seqs cannot come from vLLM: one error.
    with pytest.raises(RuntimeError, match="max_num_seqs"):
        b.build(0, _common([1] * 5, [3] * 5))


def test_reserve_nodes_widens_the_graph_bound_only():
    """A bidirectional head's draft pass (``1 + depth`` slots over a
    smaller budget): its steps are graph-safe after ``reserve_nodes``
    (launch sized from the model's length), and no buffer grows: chains
    have no rows."""
    b = _builder(budget=8)
    shape = b.masks_buf.shape
    c = _common([16, 16], [30, 2], causal=False)
    assert not b.build(0, c).graph_safe
    b.reserve_nodes(16)
    m = b.build(0, c)
    assert m.graph_safe and m.max_seq_len == 1000
    assert b.masks_buf.shape == shape


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
