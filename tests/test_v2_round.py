"""The device-side pieces of a V2-runner round (``vllm_patches.v2``) on CPU:
the ragged layout helpers, acceptance with K/V compaction by slot, the
gather that hands the drafter each kept path first, and the V2 modules'
installation. (The V2 runner itself needs CUDA: its engine tests run on
the GPU, docs/design/async-rounds.md.)"""

import math

import numpy as np
import pytest
import torch

from test_triton_masks import _common  # a step's common attention metadata
from test_triton_masks import effective_rows  # what a request's tokens see
from vllm_jetspec.tree import accept, build_tree
from vllm_jetspec.tree.ragged import (path_first_gather, position_offsets,
                                      ragged_rows, to_padded)


def _step(seed=0, R=4, B=9, D=4, K=3, V=50, layout="depth"):
    """A verify step in a V2 runner's layout: request 0 a prefill chunk of
    5 tokens (1 sampled row), the others trees of B nodes (request 2's cut
    to 6 by the scheduler), every request's rows at the end of its
    query. ``layout``: the trees' node order (best first under
    ``tree_budget: "auto"``)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(R, D, K, generator=g).log_softmax(-1)
    ids = torch.stack([torch.randperm(V, generator=g)[:K]
                       for _ in range(R * D)]).view(R, D, K)
    anchor = torch.randint(0, V, (R,), generator=g)
    tree = build_tree(logp, ids, anchor, B, layout=layout)
    counts = torch.tensor([1, B, 6, B])
    query = torch.tensor([5, B, 6, B])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), query.cumsum(0)])
    token_index = torch.cat([torch.arange(starts[r + 1] - counts[r],
                                          starts[r + 1]) for r in range(R)])
    return tree, counts, query, starts, token_index


def test_ragged_layout_round_trips():
    tree, counts, query, starts, li = _step()
    R, B = tree.tokens.shape
    M = int(counts.sum())
    rows = ragged_rows(counts, M)
    local = torch.cat([torch.arange(int(n)) for n in counts])
    assert rows.tolist() == sum(([r] * int(n) for r, n in
                                 enumerate(counts)), [])
    flat = tree.tokens[rows, local]
    padded = to_padded(flat, rows, local, R, B)
    for r in range(R):
        n = int(counts[r])
        assert padded[r, :n].tolist() == tree.tokens[r, :n].tolist()
        assert (padded[r, n:] == -1).all()
    # positions: prefix + local becomes prefix + depth
    depth = tree.depth.clamp(min=0)[rows, local]
    prefix = 100
    pos = prefix + local + position_offsets(depth, local)
    assert pos.tolist() == (prefix + depth).tolist()


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("layout", ["depth", "best_first"])
def test_accept_and_compact_moves_each_kept_path_and_reorders(kernel,
                                                              layout):
    """With the torch moves, and with the Triton kernel that moves every
    layer in one launch (the CUDA path; here in Triton's interpreter); for
    trees laid out by depth and best first (``auto``: the scheduler's cut
    is a prefix of the best-first tree)."""
    from vllm_jetspec.kernels.kv_move import KVTable
    from vllm_jetspec.vllm_patches.v2.verifier import accept_and_compact

    tree, counts, query, starts, li = _step(seed=3, layout=layout)
    R, B = tree.tokens.shape
    M = int(counts.sum())
    rows = ragged_rows(counts, M)
    local = torch.cat([torch.arange(int(n)) for n in counts])
    # The target agrees with the tree along a random path in each request
    # (deepest node of a pseudo-random choice), then differs.
    g = torch.Generator().manual_seed(1)
    tgt = torch.randint(1000, 2000, (R, B), generator=g)
    nodes = torch.minimum(counts, tree.num_nodes)
    for r in range(R):
        n = int(nodes[r])
        u = int(torch.randint(0, n, (1,), generator=g))
        while u > 0:
            p = int(tree.parents[r, u])
            tgt[r, p] = tree.tokens[r, u]
            u = p
    # K/V caches in the tree backend's layout, each slot holding its id;
    # the step's slots are consecutive per request (as vLLM maps linear
    # positions), block size 4.
    nblocks, bs = 64, 4
    kv = torch.arange(nblocks * bs, dtype=torch.float32).view(
        nblocks, 1, bs, 1, 1).expand(nblocks, 2, bs, 1, 1).clone()
    slot_of_token = torch.arange(int(starts[-1])) + 7
    slots = to_padded(slot_of_token[li], rows, local, R, B, fill=0)
    before = kv.clone()
    tokens = to_padded(tree.tokens[rows, local], rows, local, R, B)
    # the kernel compiled on a GPU (Triton's interpreter runs host tensors)
    dev = "cuda" if kernel and torch.cuda.is_available() else "cpu"
    kv_dev = kv.to(dev)
    emitted, num_acc, perm = (t.cpu() for t in accept_and_compact(
        [kv_dev], tokens.to(dev), tree.parents.to(dev),
        tree.depth.clamp(min=0).to(dev), nodes.to(dev), tgt.to(dev),
        slots.to(dev), max_depth=tree.max_depth,
        table=KVTable([kv_dev]) if kernel else None))
    kv = kv_dev.cpu()
    # the oracle: the tree core's acceptance of the same (truncated) trees
    cut = tree.valid() & (torch.arange(B)[None] < nodes[:, None])
    oracle = accept(type(tree)(
        torch.where(cut, tree.tokens, -1), torch.where(cut, tree.parents, -1),
        torch.where(cut, tree.depth, -1), tree.cum_logp, nodes,
        tree.max_depth), tgt)
    assert torch.equal(num_acc, oracle.num_accepted)
    assert torch.equal(emitted, oracle.tokens)
    for r in range(R):
        a = int(num_acc[r])
        base = int(slots[r, 0])
        for d in range(a + 1):
            src = int(slots[r, int(oracle.path_nodes[r, d])])
            s = base + d
            assert kv[s // bs, :, s % bs].flatten().tolist() == \
                before[src // bs, :, src % bs].flatten().tolist()
    # slots outside the kept paths are untouched
    kept = {int(slots[r, 0]) + d for r in range(R)
            for d in range(int(num_acc[r]) + 1)}
    for s in range(nblocks * bs):
        if s not in kept:
            assert torch.equal(kv[s // bs, :, s % bs],
                               before[s // bs, :, s % bs])
    # the drafter's gather: each request's first a + 1 verified tokens are
    # its kept path's nodes, by depth
    T = int(starts[-1])
    idx = path_first_gather(li, local, rows, perm, T)
    node_of_token = torch.full((T,), -1)
    node_of_token[li] = local
    got = node_of_token[idx]
    for r in range(R):
        first = int(starts[r + 1] - counts[r])
        a = int(num_acc[r])
        assert got[first:first + a + 1].tolist() == \
            oracle.path_nodes[r, :a + 1].tolist()
        # a permutation of the request's rows
        assert sorted(idx[first:int(starts[r + 1])].tolist()) == \
            list(range(first, int(starts[r + 1])))
    # tokens before each request's rows (prefill) map to themselves
    assert idx[:int(starts[1]) - 1].tolist() == \
        list(range(int(starts[1]) - 1))
    assert math.isfinite(float(num_acc.float().mean()))


def test_v2_patches_install_on_cpu():
    """The V2 modules import without a GPU and their patches install (and
    are listed with the vLLM functions they replace)."""
    from vllm.v1.worker.gpu import model_runner as mr

    from vllm_jetspec.vllm_patches import PATCHES, v2

    v2.apply()
    v2.apply()                        # idempotent
    assert mr.GPUModelRunner._jetspec_patched
    assert mr.init_speculator.__name__ == "init_speculator"
    names = " ".join(p.replaces for p in PATCHES)
    assert "gpu.model_runner:init_speculator" in names
    assert "prepare_attn" in names


def test_root_only_reasons():
    from vllm import SamplingParams

    from vllm_jetspec.vllm_patches.sampling import root_only_reason

    assert root_only_reason(SamplingParams(temperature=0.7, top_p=0.9,
                                           top_k=5, min_p=0.1, seed=3,
                                           logprobs=2,
                                           logit_bias={1: 2.0},
                                           min_tokens=4)) is None
    assert "presence_penalty" in root_only_reason(
        SamplingParams(presence_penalty=0.5))
    assert "repetition_penalty" in root_only_reason(
        SamplingParams(repetition_penalty=1.2))


def test_v2_graph_mode_counts_survive_profile_resets():
    """The V2 runner's CUDA-graph mode counts (read by the bench and the
    GPU engine tests) go to the profiler's current dicts, also after a
    ``jetspec_profile`` reset replaced them (the first H200 run counted
    nothing: the counter held the dict of before the reset)."""
    from types import SimpleNamespace

    from vllm_jetspec.vllm_patches.profile import StepProfiler
    from vllm_jetspec.vllm_patches.v2 import wrap_initialize_kv_cache

    def manager(mode):
        return SimpleNamespace(dispatch=lambda *a, **k: SimpleNamespace(
            cg_mode=SimpleNamespace(name=mode)))

    runner = SimpleNamespace(
        _jetspec_prof=StepProfiler(enabled=False),
        cudagraph_manager=manager("FULL"),
        speculator=SimpleNamespace(query_cudagraph_manager=manager("NONE")))
    wrap_initialize_kv_cache(lambda self, cfg: None)(runner, None)
    runner.cudagraph_manager.dispatch(1, 16, 16, num_active_loras=0)
    runner._jetspec_prof.snapshot(reset=True)
    for _ in range(2):
        runner.cudagraph_manager.dispatch(1, 16, 16, num_active_loras=0)
        runner.speculator.query_cudagraph_manager.dispatch(1, 16, 16, 0)
    assert runner._jetspec_prof.graph_modes == {"FULL": 2}
    assert runner._jetspec_prof.draft_modes == {"none": 2}


def test_builder_takes_v2_tree_rows_from_the_device():
    """V2 rounds hand the tree backend's builder the drafter's device rows
    (``tree_state.DeviceTrees``, by request-state index): a step where every
    request verifies a tree gathers them into the builder's persistent
    buffer (flags 1); a step that also holds a prefill gets flags 0 (a
    chain the kernel computes), then the tree rows and flag over them, in
    place whether or not the chunk is longer than the budget."""
    from types import SimpleNamespace as NS

    import numpy as np

    from vllm_jetspec.kernels.tree_attention_ref import _unpack_rows
    from vllm_jetspec.tree import packed_ancestor_mask
    from vllm_jetspec.vllm_patches import tree_state
    from vllm_jetspec.vllm_patches.triton_attention import \
        TritonTreeAttentionMetadataBuilder

    B = 9
    tree, *_ = _step(seed=5, R=4, B=B)
    req_masks = packed_ancestor_mask(tree)            # [4, B, 1]
    cfg = NS(speculative_config=NS(num_speculative_tokens=B - 1),
             scheduler_config=NS(max_num_seqs=4),
             model_config=NS(max_model_len=1000))
    b = TritonTreeAttentionMetadataBuilder(None, [], cfg, torch.device("cpu"))

    def tree_rows(req, n):
        return _unpack_rows(req_masks[req, :n], n)

    try:
        # every request a tree (batch rows 0, 1 are request states 3, 1)
        tree_state.set_device_trees(tree_state.DeviceTrees(
            torch.tensor([3, 1], dtype=torch.int32), np.array([True, True]),
            req_masks))
        m = b.build(0, _common([B, B], [5, 8]))
        assert m.masks.data_ptr() == b.masks_buf.data_ptr() and m.graph_safe
        assert m.tree_rows.tolist() == [1, 1]
        for r, req in enumerate((3, 1)):
            assert torch.equal(effective_rows(m, r, B), tree_rows(req, B))
        # a prefill chunk (row 1) beside a tree cut to 6 nodes (row 0)
        tree_state.set_device_trees(tree_state.DeviceTrees(
            torch.tensor([2, 0], dtype=torch.int32), np.array([True, False]),
            req_masks))
        for n in ([6, 7], [6, 70]):          # within the budget / beyond
            m = b.build(0, _common(n, [4, 0]))
            assert m.graph_safe == (n[1] <= B)
            assert m.masks.data_ptr() == b.masks_buf.data_ptr()
            assert m.tree_rows.tolist() == [1, 0]
            assert torch.equal(effective_rows(m, 0, 6), tree_rows(2, 6))
            assert torch.equal(effective_rows(m, 1, n[1]),
                               torch.ones(n[1], n[1], dtype=torch.bool)
                               .tril())
    finally:
        tree_state.set_device_trees(None)


def test_warmup_prompts_are_folded_into_the_vocabulary():
    """vLLM's V2 warm-up prefills prompts of token ids 0 .. 1 + the draft
    slots (65 for tree budget 64): for a jetspec engine on a model with a
    smaller vocabulary they reach the step folded into it (unfolded, the
    embedding's device-side assert killed the engine tests' 32-token model
    on the H200); other engines' steps are untouched. A jetspec warm-up
    step says its drafts follow (vLLM's warm-up leaves
    ``num_spec_tokens_to_schedule`` 0, which would skip its draft
    passes)."""
    from types import SimpleNamespace as NS

    from vllm.v1.core.sched.output import SchedulerOutput

    from vllm_jetspec.vllm_patches.v2 import wrap_warmup_kernels

    def orig(runner, execute, sample):
        out = SchedulerOutput.make_empty()
        ids = list(range(65))
        out.scheduled_new_reqs = [NS(prompt_token_ids=ids,
                                     prefill_token_ids=ids)]
        execute(out)
        sample(None)

    for jetspec in (True, False):
        seen = []
        runner = NS(speculative_config=NS(jetspec=object() if jetspec
                                          else None),
                    model_config=NS(get_vocab_size=lambda: 32),
                    num_speculative_steps=63)
        wrap_warmup_kernels(orig)(runner, seen.append, lambda g: None)
        new = seen[0].scheduled_new_reqs[0]
        if jetspec:
            assert new.prompt_token_ids == [t % 32 for t in range(65)]
            assert new.prefill_token_ids == new.prompt_token_ids
            assert seen[0].num_spec_tokens_to_schedule == 63
        else:
            assert new.prompt_token_ids == list(range(65))
            assert seen[0].num_spec_tokens_to_schedule == 0


def test_warmup_requests_do_not_use_up_the_fallback_warning(monkeypatch):
    """vLLM's V2 warm-up prefills requests with every sampling feature
    (``SamplingParams.for_sampler_warmup``: penalties among them). Seen as
    user requests they logged the once-only "keep one token per round"
    warning at every start-up (H200 engine log, 2026-12-04) and used it up
    before any user sent a penalty. Their root-only flag is still set (the
    warm-up's rounds run as a user's would); only the warning waits for a
    user's request."""
    from types import SimpleNamespace as NS

    from vllm import SamplingParams

    from vllm_jetspec.vllm_patches.v2 import (verifier, wrap_add_requests,
                                              wrap_warmup_kernels)

    warned = []
    monkeypatch.setattr(verifier.logger, "warning_once",
                        lambda msg, *a: warned.append(msg % a))
    v = object.__new__(verifier.TreeVerifier)
    v.root_only = np.zeros(4, dtype=bool)
    v.root_only_dev = torch.zeros(4, dtype=torch.bool)
    v.speculator = NS(add_request=lambda idx, ids: None)
    runner = NS(speculative_config=NS(jetspec=object()),
                model_config=NS(get_vocab_size=lambda: 32),
                num_speculative_steps=15, _jetspec_verifier=v,
                req_states=NS(req_id_to_index={"_warmup_0_": 0, "user": 1}))
    add = wrap_add_requests(lambda self, out: None)

    def new(req_id, params):
        return NS(scheduled_new_reqs=[NS(req_id=req_id,
                                         sampling_params=params,
                                         prompt_token_ids=[1, 2])])

    def warm(r, execute, sample):
        assert r._jetspec_in_warmup
        add(r, new("_warmup_0_", SamplingParams.for_sampler_warmup()))

    wrap_warmup_kernels(warm)(runner, lambda out: None, lambda g: None)
    assert not runner._jetspec_in_warmup
    assert v.root_only[0] and warned == []
    add(runner, new("user", SamplingParams(presence_penalty=0.5)))
    assert v.root_only[1]
    assert v.root_only_dev.tolist() == [True, True, False, False]
    assert len(warned) == 1 and "presence_penalty" in warned[0]


def test_block_tables_cover_the_draft_pass_past_max_model_len():
    """A jetspec runner's block tables get columns for the 1 + depth
    tokens the DFlash draft pass attends past max_model_len in a request's
    last rounds (without them its last row's reads ran past the table:
    an illegal memory access on the H200); other runners' and tables built
    outside initialize_kv_cache keep vLLM's width."""
    from types import SimpleNamespace as NS

    from vllm_jetspec.vllm_patches import v2

    built = []
    make = v2.block_tables_with_slack(lambda **kw: built.append(kw))
    kw = dict(block_sizes=[16, 32], max_num_reqs=1,
              max_num_blocks_per_group=[128, 64])

    def orig_init(runner, cfg):
        make(**kw)

    # 16 tokens: one more block of 16 (+1), of 32 (+1); widths kept
    # multiples of 128 tokens' worth of blocks (8 of 16, 4 of 32).
    for jetspec, want in ((True, [136, 68]), (False, [128, 64])):
        runner = NS(speculative_config=NS(jetspec=object() if jetspec
                                          else None),
                    speculator=NS(num_query_per_req=16),
                    cudagraph_manager=None, _jetspec_prof=NS())
        v2.wrap_initialize_kv_cache(orig_init)(runner, None)
        assert built[-1]["max_num_blocks_per_group"] == want
        assert v2._slack_tokens == 0
    make(**kw)
    assert built[-1]["max_num_blocks_per_group"] == [128, 64]
    # Widths not passed by name (another vLLM): built as given, warned.
    v2._slack_tokens = 16
    try:
        make(block_sizes=[16])
    finally:
        v2._slack_tokens = 0
    assert built[-1] == {"block_sizes": [16]}


def test_tree_build_setting():
    """The draft pass builds its trees with the fused kernel unless told
    otherwise (the kernel's equality with the tree core:
    kernels/test_tree_build.py)."""
    from vllm_jetspec.vllm_patches.v2.speculator import tree_build_setting

    assert tree_build_setting({}) == "kernel"
    assert tree_build_setting({"JETSPEC_TREE_BUILD": "torch"}) == "torch"
    with pytest.raises(ValueError, match="JETSPEC_TREE_BUILD"):
        tree_build_setting({"JETSPEC_TREE_BUILD": "fast"})


@pytest.mark.parametrize("sizes,warned", [([1, 2, 4, 8, 16], False),
                                          ([128], True)])
def test_draft_pass_without_its_graph_is_said(monkeypatch, sizes, warned):
    """A draft pass of 16 tokens a request finds no FULL graph when the
    capture sizes were given for the verify step only (trace8b at budget
    128, 2026-12-03): one warning at start-up; vLLM's default sizes give
    it graphs and no warning. The descriptors are those vLLM's manager
    plans for one request (``CudaGraphManager._init_candidates``)."""
    from types import SimpleNamespace

    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor

    from vllm_jetspec.vllm_patches.v2 import speculator as sp

    q, max_reqs = 16, 1
    full = [BatchExecutionDescriptor(cg_mode=CUDAGraphMode.FULL,
                                     num_tokens=q, num_reqs=1,
                                     uniform_token_count=q)
            for s in sizes if -(-s // q) * q <= max_reqs * q][:1]
    manager = SimpleNamespace(cudagraph_mode=CUDAGraphMode.FULL,
                              _capture_descs={CUDAGraphMode.FULL: full}
                              if full else {})
    fake = SimpleNamespace(
        query_cudagraph_manager=manager, num_query_per_req=q,
        vllm_config=SimpleNamespace(compilation_config=SimpleNamespace(
            cudagraph_capture_sizes=sizes)))
    said = []
    monkeypatch.setattr(sp.logger, "warning",
                        lambda msg, *a: said.append(msg % a))
    sp.JetSpecSpeculator._warn_if_draft_not_graphed(fake)
    assert bool(said) == warned, said
    if warned:
        assert "no FULL CUDA graph" in said[0] and "[128]" in said[0]
    # Eager engines (no graph mode): nothing to say.
    said.clear()
    manager.cudagraph_mode = CUDAGraphMode.NONE
    sp.JetSpecSpeculator._warn_if_draft_not_graphed(fake)
    assert not said


# -- tree_budget "auto" on the V2 runner (vllm_patches/v2/auto.py) ----------

def _v2_policy(max_budget=64):
    from vllm_jetspec.autobudget import CostModel, ObservedBudgetPolicy

    cost = CostModel(ar_ms={1: 11.0, 8: 18.0},
                     round_ms={b: {1: 12.0 + 0.05 * b, 8: 20.0 + 1.0 * b}
                               for b in (4, 16, 64)},
                     draft_ms={1: 1.0, 8: 2.0},
                     tau={4: 2.5, 16: 4.0, 64: 5.0})
    return ObservedBudgetPolicy(cost, max_budget)


def test_dynamic_schedule_is_valid_for_vllm_and_lists_every_choice():
    """The schedule handed to vLLM passes vLLM's own validation; its
    lookup by batch size is the policy's choice at calibration 1, and it
    lists every draft count the policy may pick (0: plain; vLLM captures
    a verify graph for each listed count)."""
    from vllm.v1.spec_decode.dynamic.utils import (
        build_dynamic_sd_schedule_lookup,
        validate_and_normalize_dynamic_sd_schedule)

    from vllm_jetspec.vllm_patches.v2.auto import dynamic_schedule

    p = _v2_policy()
    sched = dynamic_schedule(p, max_batch=300)
    validate_and_normalize_dynamic_sd_schedule(sched)
    assert {k for _, _, k in sched} == {0, 3, 15, 63}
    lookup = build_dynamic_sd_schedule_lookup(sched, 256, 63)
    assert [lookup[b] for b in (1, 2, 8, 200)] == \
        [p.best(b)[0] - 1 for b in (1, 2, 8, 200)]
    assert p.choices == {}             # planning is not choosing


def test_policy_lookup_and_observed_steps():
    """The scheduler's lookup asks the policy (drafts = budget - 1); a
    step's outputs teach it at the budget most of its requests ran
    (requests without drafts, e.g. prefills, and a request the scheduler
    cut near max_model_len are left out)."""
    from types import SimpleNamespace

    from vllm_jetspec.vllm_patches.v2.auto import PolicyLookup, observe_step

    p = _v2_policy()
    look = PolicyLookup(p)
    assert look[1] == 63 and look[8] == 15
    assert p.choices == {64: 1, 16: 1}
    so = SimpleNamespace(scheduled_spec_decode_tokens={
        "a": [-1] * 15, "b": [-1] * 15, "c": [-1] * 4})
    mo = SimpleNamespace(req_id_to_index={"a": 0, "b": 1, "c": 2, "p": 3},
                         sampled_token_ids=[[1, 2], [3, 4, 5, 6], [7], [8]])
    observe_step(p, so, mo)            # a, b at 16: 1 and 3 accepted
    assert p.calibration == pytest.approx(1.0 + 0.1 * (2 / 3 - 1.0))
    c = p.calibration
    observe_step(p, SimpleNamespace(scheduled_spec_decode_tokens={}), mo)
    observe_step(p, so, SimpleNamespace(req_id_to_index={},
                                        sampled_token_ids=[]))
    assert p.calibration == c


def _online_auto_config(async_scheduling: bool):
    """A vllm_config stand-in for a V2 engine with tree_budget 'auto'
    without a cost model (budgets 4, 8, 16), and the scheduler's
    __init__ patch around a no-op."""
    from types import SimpleNamespace as NS

    from vllm_jetspec.vllm_patches.config import JetSpecSettings
    from vllm_jetspec.vllm_patches.v2 import auto

    s = JetSpecSettings(budget=16, width=4, algo="accum_logp", depth=7,
                        auto_online=True)
    cfg = NS(speculative_config=NS(jetspec=s), use_v2_model_runner=True,
             scheduler_config=NS(async_scheduling=async_scheduling))
    return cfg, auto.wrap_scheduler_init(lambda self, c, *a, **k: None)


def test_auto_without_async_scheduling_is_said_and_left_static(
        monkeypatch):
    """vLLM may turn async scheduling off by itself (an executor without
    it): its synchronous scheduler takes every draft pass's drafts and
    never asks for a count, so no policy is installed (its choices would
    be reports of steps that never ran) and a warning says the engine
    drafts the largest budget every step."""
    from types import SimpleNamespace as NS

    from vllm_jetspec.vllm_patches.v2 import auto

    said = []
    monkeypatch.setattr(auto.logger, "warning",
                        lambda msg, *a: said.append(msg % a))
    cfg, init = _online_auto_config(async_scheduling=False)
    sched = NS(dynamic_sd_lookup=[15] * 4)
    init(sched, cfg)
    assert sched._jetspec_policy is None and sched.dynamic_sd_lookup == \
        [15] * 4
    assert "without async scheduling" in said[0] and "15 slots" in said[0]
    cfg.scheduler_config.async_scheduling = True
    init(sched, cfg)
    assert isinstance(sched.dynamic_sd_lookup, auto.PolicyLookup)


def test_auto_says_what_it_chose_where_vllm_logs_its_stats(monkeypatch):
    """A scheduler that logs stats (vllm serve; not LLM()) logs what auto
    chose every VLLM_LOG_STATS_INTERVAL seconds: steps per budget since
    the last line, and for the policy that measures while serving its
    tokens per step and best arm per batch bucket."""
    from types import SimpleNamespace as NS

    from vllm_jetspec.autobudget import ChoiceLog
    from vllm_jetspec.vllm_patches.v2 import auto

    said = []
    monkeypatch.setattr(auto.logger, "info",
                        lambda msg, *a: said.append(msg % a))
    cfg, init = _online_auto_config(async_scheduling=True)
    quiet = NS(dynamic_sd_lookup=[15] * 4, log_stats=False)
    init(quiet, cfg)
    assert quiet._jetspec_log is None
    sched = NS(dynamic_sd_lookup=[15] * 4, log_stats=True)
    init(sched, cfg)
    assert isinstance(sched._jetspec_log, ChoiceLog)
    t = [0.0]
    sched._jetspec_log = ChoiceLog(sched._jetspec_policy, 10.0,
                                   clock=lambda: t[0])
    said.clear()
    update = auto.wrap_update_from_output(lambda self, so, mo: None)
    so = NS(scheduled_spec_decode_tokens={}, num_scheduled_tokens={"a": 1})
    mo = NS(req_id_to_index={}, sampled_token_ids=[])
    for _ in range(3):
        sched.dynamic_sd_lookup[1]
        update(sched, so, mo)
    assert said == []
    t[0] = 10.0
    update(sched, so, mo)
    assert said and said[-1].startswith("jetspec auto: steps plain 3;")
    assert "tokens/step plain 1.00" in said[-1]


def test_scheduler_patch_installs_and_is_listed():
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_jetspec.vllm_patches import PATCHES, v2

    v2.apply()
    v2.apply()
    assert Scheduler.__init__._jetspec_wrapped
    assert Scheduler.update_from_output._jetspec_wrapped
    assert any("Scheduler.__init__" in p.replaces for p in PATCHES)


def test_draft_graphs_are_planned_without_the_dynamic_schedule(monkeypatch):
    """vLLM's graph manager would read the verify step's dynamic-SD query
    lengths for the draft pass too; the speculator plans its manager
    without them (the draft pass always runs 1 + depth tokens a
    request), and puts the schedule back."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu.spec_decode.dflash.speculator import \
        DFlashSpeculator

    from vllm_jetspec.vllm_patches.v2.speculator import JetSpecSpeculator

    seen = []
    monkeypatch.setattr(
        DFlashSpeculator, "init_cudagraph_manager",
        lambda self, mode: seen.append(
            self.vllm_config.speculative_config
            .num_speculative_tokens_per_batch_size))
    spec = SimpleNamespace(num_speculative_tokens_per_batch_size=[(1, 8, 3)])
    fake = JetSpecSpeculator.__new__(JetSpecSpeculator)
    fake.vllm_config = SimpleNamespace(speculative_config=spec)
    fake.init_cudagraph_manager("FULL")
    assert seen == [None]
    assert spec.num_speculative_tokens_per_batch_size == [(1, 8, 3)]


def test_step_clock_times_runs_of_the_same_decode_step():
    """The scheduler's clock times a step when it and the one before were
    decode steps of one budget and batch bucket (no prefill in the
    interval; a batch of 3 after one of 2 is timed, one of 4 is not)."""
    from types import SimpleNamespace

    from vllm_jetspec.vllm_patches.v2.auto import StepClock, decode_budget

    def so(counts, drafts):
        return SimpleNamespace(num_scheduled_tokens=counts,
                               scheduled_spec_decode_tokens=drafts)

    plain = so({"a": 1, "b": 1}, {})
    tree = so({"a": 16, "b": 16}, {"a": [-1] * 15, "b": [-1] * 15})
    mixed = so({"a": 16, "b": 40}, {"a": [-1] * 15})
    assert [decode_budget(x) for x in (plain, tree, mixed)] == [1, 16, None]
    t = iter([0.0, 0.010, 0.013, 0.020, 0.030, 0.031])
    clock = StepClock(clock=lambda: next(t))
    p = _v2_policy()
    seen = []
    p.observe_time = lambda b, n, ms: seen.append((b, n, round(ms, 3)))
    for x in (plain, plain, mixed, tree, tree, plain):
        clock.tick(p, x)
    assert seen == [(1, 2, 10.0), (16, 2, 10.0)]
    plain3 = so({"a": 1, "b": 1, "c": 1}, {})
    plain4 = so({"a": 1, "b": 1, "c": 1, "d": 1}, {})
    t = iter([0.0, 0.002, 0.005])
    clock, seen[:] = StepClock(clock=lambda: next(t)), []
    for x in (plain, plain3, plain4):
        clock.tick(p, x)
    assert seen == [(1, 3, 2.0)]


# -- plain steps under "auto": the draft pass keeps only the context K/V ---

class _Ran(Exception):
    """The head's forward was reached."""


def _speculator(monkeypatch, **over):
    """A JetSpecSpeculator without vLLM's set-up, whose parent propose is
    vLLM's control flow in brief: the context K/V (always), the draft
    attention metadata, the dispatch (eager when ``is_profile``), the
    head's forward through ``_generate_draft``."""
    from vllm.v1.worker.gpu.spec_decode.dflash.speculator import \
        DFlashSpeculator

    from vllm_jetspec.vllm_patches.profile import StepProfiler
    from vllm_jetspec.vllm_patches.v2.speculator import JetSpecSpeculator

    calls = []

    def parent_propose(self, input_batch, *a, dummy_run=False,
                       is_profile=False, **k):
        calls.append("context")
        meta = self._build_draft_attn_metadata(num_reqs=2,
                                               num_reqs_padded=2,
                                               num_tokens_padded=32)
        calls.append(("meta", meta))
        calls.append(("eager", is_profile))
        try:
            self._generate_draft(2, 32, meta, None, None)
        except _Ran:
            calls.append("forward")
        return self.draft_tokens[:2]

    monkeypatch.setattr(DFlashSpeculator, "propose", parent_propose)
    monkeypatch.setattr(DFlashSpeculator, "_build_draft_attn_metadata",
                        lambda self, **k: "metadata")
    sp = JetSpecSpeculator.__new__(JetSpecSpeculator)
    sp.verify_step, sp.next_num_drafts = None, None
    sp.skip_plain, sp._skipping, sp.dp_size = True, False, 1
    sp.async_scheduling = True
    sp.settings, sp.num_speculative_steps = None, 3
    sp.profiler = StepProfiler(enabled=False)
    sp.draft_tokens = torch.zeros(4, 3, dtype=torch.int64)
    for name in ("parents", "depth", "nodes"):
        setattr(sp, f"row_{name}", torch.full((4, 4) if name != "nodes"
                                              else (4,), 7))
        setattr(sp, f"req_{name}", torch.zeros((4, 4) if name != "nodes"
                                               else (4,), dtype=torch.int64))
    sp.row_masks = torch.full((4, 4, 1), 7)
    sp.req_masks = torch.zeros(4, 4, 1, dtype=torch.int64)

    def run_model(*a, **k):
        raise _Ran
    sp._run_model = run_model
    for k, v in over.items():
        setattr(sp, k, v)
    return sp, calls


def _propose(sp, dummy_run=False):
    from types import SimpleNamespace
    batch = SimpleNamespace(num_reqs=2,
                            idx_mapping=torch.tensor([2, 0]))
    return sp.propose(batch, None, None, None, None, None, None, None,
                      None, None, None, dummy_run=dummy_run)


@pytest.mark.parametrize("next_drafts,over,dummy,skipped", [
    (0, {}, False, True),             # auto chose a plain next step
    (15, {}, False, False),           # trees next step
    (None, {}, False, False),         # not known: the pass runs
    (0, {}, True, False),             # vLLM's dummy runs run it whole
    (0, {"dp_size": 2}, False, False),  # other DP ranks wait for it
    # the synchronous scheduler schedules this pass's drafts, all of them
    (0, {"async_scheduling": False}, False, False),
    (0, {"skip_plain": False}, False, False),   # JETSPEC_PLAIN_STEP_DRAFT=run
])
def test_a_draft_pass_before_a_plain_step_skips_the_head(
        monkeypatch, next_drafts, over, dummy, skipped):
    """The step after this one verifies no drafts (the scheduler's
    ``num_spec_tokens_to_schedule``, handed over by the runner): vLLM's
    propose still stores the step's context K/V in the head's cache (so
    the head sees every token when trees come back), but builds no draft
    attention metadata, dispatches eagerly (no graph replay) and runs no
    forward; the trees of the verify steps stay as they were (a plain step
    reads none). Counted as ``skipped`` in the draft modes."""
    sp, calls = _speculator(monkeypatch, **over)
    sp.next_num_drafts = next_drafts
    _propose(sp, dummy_run=dummy)
    if skipped:
        assert calls == ["context", ("meta", None), ("eager", True)]
        assert sp.profiler.draft_modes == {"skipped": 1}
        assert int(sp.req_nodes.sum()) == 0
    else:
        assert calls == ["context", ("meta", "metadata"), ("eager", False),
                         "forward"]
        assert sp.profiler.draft_modes == {}
        # a real pass hands its rows to the requests (not for dummy runs)
        assert int(sp.req_nodes.sum()) == (0 if dummy else 14)
    assert sp.next_num_drafts is None and not sp._skipping
    # The count is one step's: the next pass runs unless told again.
    calls.clear()
    _propose(sp)
    assert "forward" in calls


def test_the_runner_hands_the_next_draft_count_to_the_speculator():
    from types import SimpleNamespace as NS

    from vllm_jetspec.vllm_patches.v2 import wrap_execute_model

    seen = []
    sp = NS(next_num_drafts=None)
    runner = NS(speculator=sp)
    wrap_execute_model(lambda self, so, *a, **k: seen.append(
        self.speculator.next_num_drafts))(
        runner, NS(num_spec_tokens_to_schedule=0), None)
    assert seen == [0]
    # other speculators (stock dflash, eagle) are left alone
    other = NS(speculator=NS())
    wrap_execute_model(lambda self, so, *a, **k: None)(
        other, NS(num_spec_tokens_to_schedule=0))
    assert not hasattr(other.speculator, "next_num_drafts")


def test_a_steps_tree_handover_ends_with_the_step():
    """The trees handed to the target's attention metadata
    (``tree_state.DeviceTrees``, set in the step's ``prepare_attn``) are
    gone when ``execute_model`` returns or raises, so no later metadata --
    the draft pass of vLLM's dummy run, which proposes without sampling,
    or the step after a forward that raised -- reads a stale handover."""
    from types import SimpleNamespace as NS

    from vllm_jetspec.vllm_patches import tree_state
    from vllm_jetspec.vllm_patches.v2 import wrap_execute_model

    trees = tree_state.DeviceTrees(torch.zeros(1, dtype=torch.int32),
                                   np.array([True]),
                                   torch.zeros(1, 4, 1, dtype=torch.long))
    seen = []

    def forward(self, so, fail=False):
        tree_state.set_device_trees(trees)
        seen.append(tree_state.device_trees())
        if fail:
            raise RuntimeError("the forward failed")
        return "out"

    step = wrap_execute_model(forward)
    runner = NS(speculator=NS())
    try:
        assert step(runner, NS()) == "out"
        assert tree_state.device_trees() is None
        with pytest.raises(RuntimeError, match="forward failed"):
            step(runner, NS(), fail=True)
        assert tree_state.device_trees() is None
        assert seen == [trees, trees]
    finally:
        tree_state.set_device_trees(None)


def test_plain_step_draft_setting():
    from vllm_jetspec.vllm_patches.v2.speculator import \
        plain_step_draft_setting

    assert plain_step_draft_setting({}) == "skip"
    assert plain_step_draft_setting({"JETSPEC_PLAIN_STEP_DRAFT": "run"}) \
        == "run"
    with pytest.raises(ValueError, match="JETSPEC_PLAIN_STEP_DRAFT"):
        plain_step_draft_setting({"JETSPEC_PLAIN_STEP_DRAFT": "never"})


def test_auto_without_a_cost_model_hands_vllm_every_count():
    """``tree_budget: "auto"`` alone: the scheduler's policy is the one
    that measures while serving; the list handed to vLLM passes its
    validation, runs the largest budget until something is measured and
    lists every count (graphs for each)."""
    from types import SimpleNamespace as NS

    from vllm.v1.spec_decode.dynamic.utils import (
        build_dynamic_sd_schedule_lookup,
        validate_and_normalize_dynamic_sd_schedule)

    from vllm_jetspec.autobudget import OnlineBudgetPolicy
    from vllm_jetspec.vllm_patches.v2.auto import (dynamic_schedule,
                                                   make_policy)

    p = make_policy(NS(auto_online=True, online_budgets=[4, 8, 16, 32]))
    assert isinstance(p, OnlineBudgetPolicy) and p.candidates == [4, 8, 16,
                                                                  32]
    sched = dynamic_schedule(p, max_batch=64)
    validate_and_normalize_dynamic_sd_schedule(sched)
    assert {k for _, _, k in sched} == {0, 3, 7, 15, 31}
    lookup = build_dynamic_sd_schedule_lookup(sched, 64, 31)
    assert lookup[1] == lookup[64] == 31
    assert p.choices == {}


@pytest.mark.parametrize("seed", range(3))
def test_verify_rows_kernel_equals_the_torch_path(monkeypatch, seed):
    """The V2 verifier with its row work as Triton launches (CUDA's
    default; here in Triton's interpreter) and through the tree core's
    padded layout give the same step: positions during the forward, the
    sampler output vLLM reads (tokens, accepted counts), the K/V caches
    after the moves, the drafter's gather, and linear positions again
    after the step. Batch rows in another order than the request states,
    a prefill row, cut trees and requests kept to their root among them.
    vLLM's two CUDA-only helpers are replaced by their torch meaning."""
    from types import SimpleNamespace as NS

    from vllm import SamplingParams

    from vllm_jetspec.graphed import GraphedFn
    from vllm_jetspec.kernels.kv_move import KVTable
    from vllm_jetspec.kernels.test_tree_verify import _step
    from vllm_jetspec.vllm_patches import tree_state
    from vllm_jetspec.vllm_patches.v2 import verifier

    # CPU: the kernels in Triton's interpreter; CUDA: compiled
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s = _step(20 + seed, R=6, B=12, D=5, root_only=False)
    R, M, T = s["cu"].shape[0] - 1, s["li"].shape[0], s["T"]
    g = torch.Generator().manual_seed(seed)
    V = 500
    logits = torch.randn(M, V, generator=g)
    logits[torch.arange(M), s["tgt"]] = 50.0
    logits = logits.to(dev)
    s = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in s.items()}

    def num_sampled_and_rejected(num_sampled, seq_lens, cu, idx, prefill):
        return num_sampled, (cu[1:] - cu[:-1]).int() - num_sampled

    monkeypatch.setattr(verifier, "get_num_sampled_and_rejected",
                        num_sampled_and_rejected)
    monkeypatch.setattr(verifier, "async_tensor_h2d",
                        lambda a, dev: torch.from_numpy(a).to(dev))
    sampler = NS(compute_nans=False, returns_logprobs=lambda idx: True,
                 req_states=NS(prefill_len=NS(gpu=None)),
                 sample=lambda lg, *a, **k: (lg.argmax(-1), None))
    idx_np = s["idx"].cpu().numpy()
    cu_np = s["cu"].cpu().numpy()
    pos0 = torch.randint(0, 900, (T + 7,), generator=g).to(dev)
    bs = 4
    kv0 = torch.randn(4 * (T + 7) // bs + 1, 2, bs, 2, 8,
                      generator=g).to(dev)

    def run(kernel):
        sp = NS(req_parents=s["req_parents"], req_depth=s["req_depth"],
                req_nodes=s["req_nodes"], req_masks=None, verify_step=None)
        v = object.__new__(verifier.TreeVerifier)
        kv = [kv0.clone(), kv0.clone()]
        v.sampler, v.speculator, v.depth = sampler, sp, s["D"]
        v.root_only = np.zeros(12, dtype=bool)
        v.root_only_dev = torch.zeros(12, dtype=torch.bool, device=dev)
        # a request with a penalty (kept to its root), added the runner's
        # way
        v.add_request(int(idx_np[1]), SamplingParams(presence_penalty=1.0),
                      warn=False)
        v._kv, v._group = kv, 0
        v._table = KVTable(kv) if kernel else None
        v.kernel = kernel
        v.accept = GraphedFn(v._accept, "acceptance", enabled=False)
        # what the logprobs of the emitted tokens are gathered by
        lp = []
        v._logprobs = lambda *a: lp.append(a[3:5])
        batch = NS(
            num_reqs=R, num_tokens=T, num_draft_tokens=M - R,
            num_draft_tokens_per_req=np.diff(cu_np) - 1,
            logits_indices=s["li"], cu_num_logits=s["cu"],
            cu_num_logits_np=cu_np, idx_mapping=s["idx"],
            idx_mapping_np=idx_np, expanded_idx_mapping=s["exp_idx"],
            expanded_local_pos=s["local"], positions=pos0.clone(),
            input_ids=s["input_ids"], seq_lens=None)
        v.begin_step(batch, s["slot_mapping"][None])
        during = batch.positions.clone()
        out = v(logits, batch)
        assert tree_state.device_trees() is None
        step = sp.verify_step
        assert step.kernel is kernel
        step.linear_positions(batch.positions)
        assert torch.equal(batch.positions, pos0)
        assert out.logprobs_tensors is None and len(lp) == 1
        return during, out, kv, step, lp[0]

    d0, o0, kv_t, st_t, lp_t = run(False)
    d1, o1, kv_k, st_k, lp_k = run(True)
    # the emitted tokens and the node order the logprobs are gathered by
    for a, b in zip(lp_t, lp_k):
        assert torch.equal(a, b)
    assert torch.equal(d0, d1)
    assert not torch.equal(d0, pos0)
    assert torch.equal(o0.sampled_token_ids, o1.sampled_token_ids)
    assert torch.equal(o0.num_sampled, o1.num_sampled)
    assert torch.equal(o0.num_rejected, o1.num_rejected)
    assert o1.num_sampled.dtype == torch.int32
    assert int(o1.num_sampled.max()) > 1
    # the root-only request kept one token
    assert int(o1.num_sampled[1]) == 1
    for a, b in zip(kv_t, kv_k):
        assert torch.equal(a, b)
    assert not torch.equal(kv_k[0], kv0)
    assert torch.equal(st_t.reorder, st_k.reorder)
    assert torch.equal(st_t.pos_offset, st_k.pos_offset)



def test_verify_rows_setting():
    from vllm_jetspec.vllm_patches.config import verify_rows_setting

    assert verify_rows_setting({}) == "kernel"
    assert verify_rows_setting({"JETSPEC_VERIFY_ROWS": " torch "}) == "torch"
    with pytest.raises(ValueError, match="JETSPEC_VERIFY_ROWS must be"):
        verify_rows_setting({"JETSPEC_VERIFY_ROWS": "1"})


@pytest.mark.parametrize("R", [1, 8])
def test_verify_step_launch_counts(monkeypatch, R):
    """What a verify step dispatches around vLLM's sampler (``begin_step``,
    the verifier after sampling, the drafter's undo of the positions),
    counted with a torch dispatch mode (each aten op a CUDA launch on a
    GPU; views and metadata ops aside) and by wrapping the Triton kernels:
    the kernel path 3 aten ops (the sampler's two input gathers, the
    gather's identity) + 4 Triton launches; the torch path (its
    acceptance graph run eagerly here) 29 ops outside that graph, 61
    inside it, + the K/V move. Budget 16, depth 15: the shipped head's
    round. The figures of docs/design/async-rounds.md §5.3."""
    import collections
    from types import SimpleNamespace as NS

    from torch.utils._python_dispatch import (TorchDispatchMode,
                                              _disable_current_modes)

    from vllm_jetspec.graphed import GraphedFn
    from vllm_jetspec.kernels import kv_move, tree_verify
    from vllm_jetspec.kernels.kv_move import KVTable
    from vllm_jetspec.kernels.test_tree_verify import _step
    from vllm_jetspec.vllm_patches.v2 import verifier

    views = {"empty", "view", "_to_copy", "slice", "select", "detach",
             "alias", "lift_fresh", "_unsafe_view", "expand", "unsqueeze",
             "t", "as_strided", "scalar_tensor"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in views:
                self.n += 1
            return func(*args, **(kwargs or {}))

    triton_calls = collections.Counter()
    for name in ("_accept_rows_kernel", "_tree_positions_kernel"):
        k = getattr(tree_verify, name)
        monkeypatch.setattr(tree_verify, name, _Launches(k, name,
                                                         triton_calls))
    monkeypatch.setattr(kv_move, "_move_kv_kernel",
                        _Launches(kv_move._move_kv_kernel, "move",
                                  triton_calls))
    inside = Count()
    monkeypatch.setattr(verifier, "accept_and_compact",
                        _counted(verifier.accept_and_compact, inside,
                                 _disable_current_modes))
    monkeypatch.setattr(verifier, "get_num_sampled_and_rejected",
                        lambda n, *a: (n, n))
    s = _step(1, R=R, B=16, D=15, max_reqs=R + 3)
    M, T = s["li"].shape[0], s["T"]
    cu_np, idx_np = s["cu"].numpy(), s["idx"].numpy()
    # CPU: the kernels in Triton's interpreter; CUDA: compiled
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in s.items()}
    sampler = NS(compute_nans=False, returns_logprobs=lambda i: False,
                 req_states=NS(prefill_len=NS(gpu=None)),
                 sample=lambda lg, *a, **k: (s["tgt"], None))
    counts = {}
    for kernel in (False, True):
        triton_calls.clear()
        inside.n = 0
        sp = NS(req_parents=s["req_parents"], req_depth=s["req_depth"],
                req_nodes=s["req_nodes"], req_masks=None, verify_step=None)
        v = object.__new__(verifier.TreeVerifier)
        kv = [torch.zeros(64, 2, 16, 2, 8, device=dev) for _ in range(2)]
        v.sampler, v.speculator, v.depth = sampler, sp, 15
        v.root_only = np.zeros(R + 3, dtype=bool)
        v.root_only_dev = torch.zeros(R + 3, dtype=torch.bool, device=dev)
        v._kv, v._group, v._table, v.kernel = kv, 0, KVTable(kv), kernel
        v.accept = GraphedFn(v._accept, "acceptance", enabled=False)
        batch = NS(
            num_reqs=R, num_tokens=T, num_draft_tokens=M - R,
            num_draft_tokens_per_req=np.diff(cu_np) - 1,
            logits_indices=s["li"], cu_num_logits=s["cu"],
            cu_num_logits_np=cu_np, idx_mapping=s["idx"],
            idx_mapping_np=idx_np,
            expanded_idx_mapping=s["exp_idx"], expanded_local_pos=s["local"],
            positions=torch.zeros(T + 7, dtype=torch.long, device=dev),
            input_ids=s["input_ids"], seq_lens=None)
        logits = torch.zeros(M, 50, device=dev)
        with Count() as c:
            v.begin_step(batch, s["slot_mapping"][None])
            v(logits, batch)
            sp.verify_step.linear_positions(batch.positions)
        counts[kernel] = (c.n, inside.n, dict(triton_calls))
    assert counts[True] == (3, 0, {"_tree_positions_kernel": 2,
                                   "_accept_rows_kernel": 1, "move": 1})
    assert counts[False] == (29, 61, {"move": 1})


class _Launches:
    """A Triton kernel whose launches are counted (run outside any torch
    dispatch mode: the interpreter's own tensor work is not a launch)."""

    def __init__(self, kernel, name, counter):
        self.kernel, self.name, self.counter = kernel, name, counter

    def __getitem__(self, grid):
        from torch.utils._python_dispatch import _disable_current_modes

        self.counter[self.name] += 1
        launch = self.kernel[grid]

        def run(*a, **k):
            with _disable_current_modes():
                return launch(*a, **k)
        return run


def _counted(fn, mode, disable):
    """``fn`` with the ops it dispatches counted by ``mode`` alone."""
    def wrapped(*a, **k):
        with disable():
            with mode:
                return fn(*a, **k)
    return wrapped


def test_dflash_input_kernel_compiles_every_block_size_at_first_launch(
        monkeypatch):
    """vLLM's ``prepare_dflash_inputs`` (the draft pass's input kernel,
    stock code) picks its kernel's BLOCK_SIZE from the step's longest
    query: through the wrapper, the first launch (vLLM's warm-up) also
    compiles every other block size with the same arguments, and no later
    step -- decode, verify, prefills up to the batch's token limit --
    launches a block size not compiled then. Before, the first real
    prompts compiled theirs inside served steps (H200, 2026-12-05)."""
    from types import SimpleNamespace as NS

    from vllm.v1.worker.gpu.spec_decode.dflash import speculator as m

    from vllm_jetspec.vllm_patches.v2.precompile import (
        PrecompileOnFirstLaunch, dflash_block_sizes)

    log = []

    class Kernel:
        __name__ = "_prepare_dflash_inputs_kernel"

        def __getitem__(self, grid):
            return lambda *a, **k: log.append(("launch", grid, a, k))

        def warmup(self, *a, grid, **k):
            log.append(("warmup", grid, a, k))

    nq = 16                                  # 1 + depth 15
    wrapper = PrecompileOnFirstLaunch(Kernel(), "BLOCK_SIZE")
    wrapper.values = dflash_block_sizes(nq)
    assert wrapper.values == (32, 64, 128, 256)
    monkeypatch.setattr(m, "_prepare_dflash_inputs_kernel", wrapper)
    # vLLM's CPU build imports a placeholder for Triton; the launch code
    # only needs its helpers
    import triton
    monkeypatch.setattr(m, "triton", triton)
    t = torch.zeros(8, dtype=torch.int64)
    bufs = NS(input_ids=t, positions=t, query_start_loc=t, seq_lens=t)

    def step(longest):
        batch = NS(num_reqs=2, num_scheduled_tokens=np.array([1, longest]),
                   positions=t, query_start_loc=t, idx_mapping=t)
        m.prepare_dflash_inputs(
            bufs, t, t, t, t, t, t, batch, t, t, t, t,
            torch.zeros(2, 4, dtype=torch.int32), 16, 0, nq, nq - 1, 4,
            64, 2048)

    step(nq + 1)                    # vLLM's warm-up prefill: 1 + drafts
    first = log[0]
    assert first[0] == "launch" and first[3]["BLOCK_SIZE"] == 64
    warm = log[1:]
    assert sorted(w[3]["BLOCK_SIZE"] for w in warm) == [32, 128, 256]
    for w in warm:                  # the launch's own arguments
        assert w[2] == first[2]
        assert {k: v for k, v in w[3].items() if k != "BLOCK_SIZE"} == \
            {k: v for k, v in first[3].items() if k != "BLOCK_SIZE"}
    del log[:]
    for longest in (1, nq, 17, 100, 113, 240, 241, 512, 2048):
        step(longest)
    assert all(e[0] == "launch" for e in log)
    assert {e[3]["BLOCK_SIZE"] for e in log} <= set(wrapper.values)
    # Without block sizes (no jetspec engine): a pass-through.
    plain = PrecompileOnFirstLaunch(Kernel(), "BLOCK_SIZE")
    del log[:]
    plain[(1,)](1, BLOCK_SIZE=64)
    assert [e[0] for e in log] == ["launch"]


@pytest.mark.parametrize("causal", [True, False])
def test_builder_chain_steps_in_one_launch_equal_the_torch_path(causal):
    """A step without trees (prefill chunks, plain decoding, the draft
    pass; padded requests of a CUDA graph among them) gets from the chain
    kernel (one launch, here in Triton's interpreter) the metadata the
    builder's torch path makes: tree flags 0, prefixes, query starts, in
    the builder's persistent buffers, no mask row; and beside a V2 tree,
    the tree's rows and flag over them."""
    from types import SimpleNamespace as NS

    import numpy as np

    from vllm_jetspec.kernels import tree_verify
    from vllm_jetspec.tree import packed_ancestor_mask
    from vllm_jetspec.vllm_patches import tree_state
    from vllm_jetspec.vllm_patches.triton_attention import \
        TritonTreeAttentionMetadataBuilder

    B = 17
    cfg = NS(speculative_config=NS(num_speculative_tokens=B - 1),
             scheduler_config=NS(max_num_seqs=6),
             model_config=NS(max_model_len=1000))

    launches = []
    real = tree_verify.chain_step_metadata

    def counted(*a, **k):
        launches.append(1)
        return real(*a, **k)

    tree, *_ = _step(seed=5, R=4, B=B - 1)
    req_masks = packed_ancestor_mask(tree)
    steps = [([1], [40]), ([16, 16, 16], [5, 90, 0]),     # decode, drafts
             ([3, 17, 1, 0, 0], [0, 2, 30, 0, 0]),        # padded requests
             ([1, 1, 1, 1], [0, 3, 9, 4])]                # a dummy length
    b_torch = TritonTreeAttentionMetadataBuilder(None, [], cfg,
                                                 torch.device("cpu"))
    b_kernel = TritonTreeAttentionMetadataBuilder(None, [], cfg,
                                                  torch.device("cpu"))
    assert not b_kernel.chain_kernel      # on CUDA only, unless told
    b_kernel.chain_kernel = True
    orig = tree_verify.chain_step_metadata
    tree_verify.chain_step_metadata = counted
    try:
        for i, (n, prefix) in enumerate(steps + steps[:2]):
            # the last two steps: a request state with a tree beside them
            dev = None
            if i >= len(steps) and causal:
                dev = tree_state.DeviceTrees(
                    torch.tensor([2] * len(n), dtype=torch.int32),
                    np.array([True] + [False] * (len(n) - 1)), req_masks)
            c = _common(n, prefix, causal)
            if i == 3:
                c.seq_lens[0] = 0       # shorter than its query (warm-up)
            got = []
            for b in (b_torch, b_kernel):
                b.masks_buf.fill_(5)
                b.prefix_buf.fill_(-3)
                b.qsl_buf.fill_(-7)
                b.tree_buf.fill_(9)
                tree_state.set_device_trees(dev)
                m = b.build(0, c)
                got.append((m, b.masks_buf.clone(), b.prefix_buf.clone(),
                            b.qsl_buf.clone(), b.tree_buf.clone()))
            (mt, *bt), (mk, *bk) = got
            R = len(n)
            assert mk.graph_safe and mt.graph_safe
            assert mk.masks.data_ptr() == b_kernel.masks_buf.data_ptr()
            assert mk.prefix_lens.data_ptr() == b_kernel.prefix_buf.data_ptr()
            assert mk.tree_rows.data_ptr() == b_kernel.tree_buf.data_ptr()
            assert torch.equal(mk.prefix_lens, mt.prefix_lens)
            assert torch.equal(mk.query_start_loc, mt.query_start_loc)
            assert torch.equal(mk.tree_rows, mt.tree_rows)
            assert mk.tree_rows.tolist() == [int(dev is not None and r == 0)
                                             for r in range(R)]
            # the masks: the tree's rows where there is one, nothing else
            assert torch.equal(bk[0], bt[0])
            assert (bk[0][1:] == 5).all() and \
                (dev is not None or (bk[0] == 5).all())
            assert torch.equal(bk[1][:R], bt[1][:R])
            assert torch.equal(bk[2][:R + 1], bt[2][:R + 1])
            assert (mk.max_nodes, mk.causal) == (mt.max_nodes, mt.causal)
    finally:
        tree_verify.chain_step_metadata = orig
        tree_state.set_device_trees(None)
    assert len(launches) == len(steps) + 2


def test_draft_builders_hold_a_bidirectional_heads_draft_pass(monkeypatch):
    """A bidirectional head keeps its block size's depth below a smaller
    budget (16 slots a request at budget 8): the draft layers' builders are
    told when vLLM sets the drafter's attention up, so a draft step's
    launch is sized from capture-time bounds (graph_safe) and a FULL draft
    graph can replay it -- before, its prefixes and masks were fresh
    tensors, freed after capture (found in review, 2026-12-05; since, no
    step's tensors are: chains have no rows). The target's builder keeps
    its bound at the budget."""
    from types import SimpleNamespace as NS

    from vllm.v1.worker.gpu.spec_decode.dflash.speculator import \
        DFlashSpeculator

    from vllm_jetspec.vllm_patches.triton_attention import \
        TritonTreeAttentionMetadataBuilder
    from vllm_jetspec.vllm_patches.v2.speculator import JetSpecSpeculator

    budget, slots = 8, 16
    cfg = NS(speculative_config=NS(num_speculative_tokens=budget - 1),
             scheduler_config=NS(max_num_seqs=4),
             model_config=NS(max_model_len=1000))

    def builder():
        return TritonTreeAttentionMetadataBuilder(None, [], cfg,
                                                  torch.device("cpu"))

    def draft_step(b):
        return b.build(0, _common([slots, slots], [30, 50],
                                           causal=False))

    assert not draft_step(builder()).graph_safe       # what went wrong
    draft, target = builder(), builder()
    monkeypatch.setattr(DFlashSpeculator, "set_attn",
                        lambda self, *a, **k: setattr(
                            self, "attn_groups",
                            [[NS(metadata_builders=[draft, object()])], []]))
    sp = JetSpecSpeculator.__new__(JetSpecSpeculator)
    sp.num_query_per_req = slots
    sp.set_attn(None, None, None, None, [[NS(metadata_builders=[target])]])
    assert draft.graph_nodes == slots
    assert target.graph_nodes == budget
    m = draft_step(draft)
    assert m.graph_safe and m.max_seq_len == 1000
    assert m.masks.data_ptr() == draft.masks_buf.data_ptr()
    assert m.prefix_lens.data_ptr() == draft.prefix_buf.data_ptr()
    assert m.prefix_lens.tolist() == [30, 50]
    # every slot of a request sees all its slots (not causal): a chain
    assert m.tree_rows.tolist() == [0, 0] and m.causal is False
    assert effective_rows(m, 0, slots).all()
    # a budget's worth (or a causal head's depth) leaves the bound as is
    draft.reserve_nodes(budget)
    assert draft.graph_nodes == slots
