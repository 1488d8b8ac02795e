"""``vllm_jetspec.graphed``: one graph per input signature, replayed on
static buffers. On CPU through ``HostGraph`` (the same buffer plumbing);
where CUDA is available (the GPU machine) also with real CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from vllm_jetspec.graphed import GraphedFn
from vllm_jetspec.tree import accept, build_tree

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def graphed(fn, device, **kw):
    return GraphedFn(fn, "test", host_graphs=device == "cpu", **kw)


def head_outputs(R, D, K, V, seed, device):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(R, D, V, generator=g).log_softmax(-1)
    v, i = logp.topk(K, dim=-1)
    anchor = torch.randint(0, V, (R,), generator=g)
    return v.to(device), i.to(device), anchor.to(device)


def _build(v, i, anchor, *, budget, algo):
    return build_tree(v, i, anchor, budget, algo=algo)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["accum_logp", "topb_prefix", "chain"])
def test_build_replays_equal_eager(device, algo):
    """Every call of a shape equals the eager construction on that call's
    inputs (fresh inputs each time: a replay that ignored them would
    repeat the first tree); results alias the graph's output buffers."""
    fn = graphed(_build, device)
    ptrs = []
    for seed in range(4):
        v, i, a = head_outputs(3, 7, 5, 50, seed, device)
        got = fn(v, i, a, budget=24, algo=algo)
        want = build_tree(v, i, a, 24, algo=algo)
        for f in ("tokens", "parents", "depth", "num_nodes"):
            assert torch.equal(getattr(got, f), getattr(want, f)), (seed, f)
        assert torch.equal(got.cum_logp, want.cum_logp)
        assert got.max_depth == want.max_depth     # a non-tensor field
        ptrs.append(got.tokens.data_ptr())
    assert len(fn.graphs) == 1 and fn.replays == 3
    # The first call returns the warm-up's result, later ones the buffers.
    assert len(set(ptrs[1:])) == 1
    # Another batch size or budget: another graph.
    v, i, a = head_outputs(2, 7, 5, 50, 9, device)
    assert torch.equal(fn(v, i, a, budget=24, algo=algo).tokens,
                       build_tree(v, i, a, 24, algo=algo).tokens)
    fn(v, i, a, budget=8, algo=algo)
    assert len(fn.graphs) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_accept_replays_equal_eager(device):
    fn = graphed(lambda *t, max_depth: tuple(vars(accept(
        type(tree)(*t[:5], max_depth=max_depth), t[5])).values()), device)
    for seed in range(3):
        v, i, a = head_outputs(4, 6, 3, 20, seed, device)
        tree = build_tree(v, i, a, 16)
        g = torch.Generator().manual_seed(seed)
        # Targets that follow the first branch for a few steps.
        tgt = torch.where(torch.rand(4, 16, generator=g) < 0.7,
                          tree.tokens.cpu().roll(-1, 1),
                          torch.randint(0, 20, (4, 16), generator=g))
        tgt = tgt.to(device)
        got = fn(tree.tokens, tree.parents, tree.depth, tree.cum_logp,
                 tree.num_nodes, tgt, max_depth=tree.max_depth)
        want = accept(tree, tgt)
        for x, y in zip(got, vars(want).values()):
            assert torch.equal(x, y), seed


@pytest.mark.parametrize("device", DEVICES)
def test_side_effects_once_per_call(device):
    """A function that writes outside its outputs (the runner's K/V moves)
    runs exactly once per call: the capturing call returns the warm-up's
    result instead of replaying it a second time."""
    acc = torch.zeros(4, device=device)

    def add(x):
        acc.add_(x)
        return acc * 1

    fn = graphed(add, device)
    x = torch.arange(4.0, device=device)
    for n in range(1, 5):
        out = fn(x)
        assert torch.equal(acc, n * x) and torch.equal(out, n * x)


@pytest.mark.parametrize("device", DEVICES)
def test_most_graphs_then_eager(device):
    fn = graphed(lambda x: x * 2, device, max_graphs=2)
    for n in (1, 2, 3, 4, 3):
        x = torch.arange(float(n), device=device)
        assert torch.equal(fn(x), x * 2)
    assert len(fn.graphs) == 2


def test_disabled_or_cpu_without_host_graphs_is_eager():
    calls = []

    def f(x):
        calls.append(1)
        return x + 1

    x = torch.ones(3)
    for fn in (GraphedFn(f, "off", enabled=False), GraphedFn(f, "cpu")):
        assert torch.equal(fn(x), x + 1) and torch.equal(fn(x), x + 1)
        assert fn.graphs == {}
    assert len(calls) == 4


@pytest.mark.parametrize("device", DEVICES)
def test_function_that_waits(device):
    """A function that waits for the device (``.item()``) cannot be
    captured on CUDA: a warning, and that shape runs eagerly (right
    results, no error). A host graph replays it like any other."""
    fn = graphed(lambda x: x * int(x.sum().item()), device)
    for n in (3, 3, 3, 5):
        x = torch.ones(n, device=device)
        assert torch.equal(fn(x), x * n)
    assert len(fn.graphs) == 2
    if device == "cuda":
        assert list(fn.graphs.values()) == [None, None]
        assert fn.replays == 0
    else:
        assert fn.replays == 2


def test_draft_graphs_setting():
    """JETSPEC_DRAFT_GRAPHS: 1 (default), 0, host; anything else is one
    clear error. CUDA graphs of the draft pass only on CUDA engines that
    capture graphs themselves; host everywhere when asked."""
    from types import SimpleNamespace as NS

    from vllm.config import CUDAGraphMode

    from vllm_jetspec.vllm_patches.draft_pass import (draft_graphs_setting,
                                                      draft_graphs_wanted)
    assert draft_graphs_setting({}) == "1"
    for v in ("0", "1", "host"):
        assert draft_graphs_setting({"JETSPEC_DRAFT_GRAPHS": v}) == v
    with pytest.raises(ValueError, match="JETSPEC_DRAFT_GRAPHS"):
        draft_graphs_setting({"JETSPEC_DRAFT_GRAPHS": "yes"})

    def cfg(eager=False, mode=CUDAGraphMode.FULL_AND_PIECEWISE, dp=1):
        return NS(model_config=NS(enforce_eager=eager),
                  compilation_config=NS(cudagraph_mode=mode),
                  parallel_config=NS(data_parallel_size=dp))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert draft_graphs_wanted(cfg(), cuda, {}) == "cuda"
    assert draft_graphs_wanted(cfg(), cpu, {}) is None
    assert draft_graphs_wanted(cfg(eager=True), cuda, {}) is None
    assert draft_graphs_wanted(cfg(mode=CUDAGraphMode.NONE), cuda, {}) \
        is None
    assert draft_graphs_wanted(cfg(dp=2), cuda, {}) is None
    assert draft_graphs_wanted(cfg(), cuda,
                               {"JETSPEC_DRAFT_GRAPHS": "0"}) is None
    assert draft_graphs_wanted(cfg(eager=True), cpu,
                               {"JETSPEC_DRAFT_GRAPHS": "host"}) == "host"
