"""The verify-step kernels equal their torch reference (the tree core's
acceptance, compaction plan and path-first order over the padded layout):
random steps mixing prefill rows, whole trees, trees the scheduler cut,
stored trees smaller than their rows, requests kept to their root, trees
laid out by depth and best first, batch rows in another order than the
request states. In Triton's interpreter without a GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_jetspec.kernels.tree_verify import (  # noqa: E402
    accept_rows, tree_positions, untree_positions)
from vllm_jetspec.kernels.tree_verify_ref import (  # noqa: E402
    accept_rows_ref, tree_positions_ref)
from vllm_jetspec.tree import build_tree  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.independent


def _step(seed, R=5, B=16, D=6, K=3, layout="depth", root_only=False,
          max_reqs=9):
    """A verify step in the V2 runner's layout (host tensors)."""
    g = torch.Generator().manual_seed(seed)
    V = 500
    logp = torch.randn(R, D, K, generator=g).log_softmax(-1)
    ids = torch.stack([torch.randperm(V, generator=g)[:K]
                       for _ in range(R * D)]).view(R, D, K)
    anchor = torch.randint(0, V, (R,), generator=g)
    tree = build_tree(logp, ids, anchor, B, layout=layout)
    # request states: batch row r is state idx[r]
    idx = torch.randperm(max_reqs, generator=g)[:R].int()
    req_parents = torch.full((max_reqs, B), -1, dtype=torch.long)
    req_depth = torch.zeros(max_reqs, B, dtype=torch.long)
    req_nodes = torch.randint(1, B + 1, (max_reqs,), generator=g)
    req_parents[idx.long()] = tree.parents
    req_depth[idx.long()] = tree.depth.clamp(min=0)
    req_nodes[idx.long()] = tree.num_nodes
    # rows per request: a prefill row, whole trees, a cut tree, and a
    # stored tree smaller than its rows (rows past it: padding nodes)
    kinds = torch.randint(0, 4, (R,), generator=g).tolist()
    counts, query = [], []
    for r, kind in enumerate(kinds):
        n = int(tree.num_nodes[r])
        if kind == 0:
            c, q = 1, int(torch.randint(1, 9, (1,), generator=g))
        elif kind == 1:
            c = n
            q = c
        elif kind == 2:
            c = int(torch.randint(1, n + 1, (1,), generator=g))
            q = c
        else:
            c = min(B, n + int(torch.randint(0, 4, (1,), generator=g)))
            req_nodes[idx[r]] = max(1, n - 2)
            q = c
        counts.append(c)
        query.append(q)
    counts = torch.tensor(counts)
    query = torch.tensor(query)
    qstart = torch.cat([torch.zeros(1, dtype=torch.long), query.cumsum(0)])
    T = int(qstart[-1])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    li = torch.cat([torch.arange(qstart[r + 1] - counts[r], qstart[r + 1])
                    for r in range(R)])
    M = li.shape[0]
    local = torch.arange(M) - cu[torch.repeat_interleave(
        torch.arange(R), counts)]
    rows = torch.repeat_interleave(torch.arange(R), counts)
    # the step's token ids: the trees' nodes at their rows (padding
    # nodes: token 0), random prompt tokens elsewhere; padded buffers
    input_ids = torch.randint(0, V, (T + 7,), generator=g, dtype=torch.int32)
    tok = tree.tokens[rows, local]
    input_ids[li] = torch.where(tok >= 0, tok, 0).int()
    slot_mapping = torch.randperm(4 * (T + 7), generator=g)[:T + 7]
    # the target agrees along a random path of each tree, else random
    tgt = torch.randint(0, V, (M,), generator=g)
    for r in range(R):
        c = int(counts[r])
        u = int(torch.randint(0, c, (1,), generator=g))
        while u > 0:
            p = int(tree.parents[r, u])
            tgt[int(cu[r]) + p] = int(tree.tokens[r, u])
            u = p
    ro = None
    if root_only:
        ro = torch.rand(max_reqs, generator=g) < 0.4
    exp_idx = idx.long()[rows].int()
    return dict(cu=cu.int(), li=li, input_ids=input_ids, tgt=tgt,
                slot_mapping=slot_mapping, idx=idx, req_parents=req_parents,
                req_depth=req_depth, req_nodes=req_nodes, root_only=ro,
                exp_idx=exp_idx, local=local.int(), T=T, D=D,
                N=int(counts.max()))


def _dev(x):
    return x.to(DEV) if torch.is_tensor(x) else x


@pytest.mark.parametrize("layout", ["depth", "best_first"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("root_only", [False, True])
def test_accept_rows_matches_reference(seed, layout, root_only):
    s = _step(seed, layout=layout, root_only=root_only)
    args = [s[k] for k in ("cu", "li", "input_ids", "tgt", "slot_mapping",
                           "idx", "req_parents")]
    want = accept_rows_ref(*args, s["req_depth"], s["req_nodes"],
                           s["root_only"], max_depth=s["D"],
                           num_tokens=s["T"])
    got = accept_rows(*map(_dev, args), _dev(s["req_nodes"]),
                      _dev(s["root_only"]), max_depth=s["D"],
                      num_tokens=s["T"], max_rows=s["N"])
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name].cpu(), want[name]), name
    # something was accepted somewhere (the test is not all-roots)
    if not root_only:
        assert int(want["num_sampled"].max()) > 1


def test_accept_rows_budget_and_depth_edges():
    """One-node trees (budget 1), a 64-node tree of depth 15 (a chain's
    depth), and 130 nodes (three mask words' worth of rows)."""
    for seed, (B, D, K) in enumerate([(1, 3, 2), (64, 15, 4),
                                      (130, 8, 6)]):
        s = _step(10 + seed, R=3, B=B, D=D, K=K)
        args = [s[k] for k in ("cu", "li", "input_ids", "tgt",
                               "slot_mapping", "idx", "req_parents")]
        want = accept_rows_ref(*args, s["req_depth"], s["req_nodes"], None,
                               max_depth=D, num_tokens=s["T"])
        got = accept_rows(*map(_dev, args), _dev(s["req_nodes"]), None,
                          max_depth=D, num_tokens=s["T"], max_rows=s["N"])
        for name in want:
            assert torch.equal(got[name].cpu(), want[name]), (B, name)


def test_a_malformed_tree_cannot_walk_past_its_rows():
    """A root stored as its own parent (no writer does this: trees store
    the root's parent as -1) would let the walk stay at the root while the
    target repeats its token, to depth D past a request of fewer rows, and
    move K/V into other requests' slots: the walk is bounded by the
    request's node count (found in review, 2026-12-05)."""
    s = _step(4, R=4, B=16, D=6)
    # what the kernel relies on: a child after its parent, in both layouts
    for layout in ("depth", "best_first"):
        t = _step(5, R=4, B=16, D=6, layout=layout)["req_parents"]
        k = torch.arange(t.shape[1])
        assert bool(((t < k) | (t == -1)).all())
    cu = s["cu"]
    for r in range(4):
        req = int(s["idx"][r])
        s["req_parents"][req, 0] = 0            # the root its own parent
        row = int(cu[r])
        s["tgt"][row] = s["input_ids"][int(s["li"][row])]   # matches root
    got = accept_rows(*[_dev(s[k]) for k in (
        "cu", "li", "input_ids", "tgt", "slot_mapping", "idx",
        "req_parents", "req_nodes")], None, max_depth=s["D"],
        num_tokens=s["T"], max_rows=s["N"])
    counts = (cu[1:] - cu[:-1]).tolist()
    for r in range(4):
        n = min(counts[r], int(s["req_nodes"][int(s["idx"][r])]))
        assert 1 <= int(got["num_sampled"][r]) <= n
        # every K/V move stays among the request's own slots
        own = set(s["slot_mapping"][s["li"][int(cu[r]):int(cu[r + 1])]]
                  .tolist())
        for t in got["src"][r].tolist() + got["dst"][r].tolist():
            assert t == -1 or t in own


def test_rows_beyond_the_stored_tree_are_refused():
    s = _step(0, R=2, B=4)
    with pytest.raises(ValueError, match="rows"):
        accept_rows(*[_dev(s[k]) for k in (
            "cu", "li", "input_ids", "tgt", "slot_mapping", "idx",
            "req_parents", "req_nodes")], None, max_depth=s["D"],
            num_tokens=s["T"], max_rows=5)


@pytest.mark.parametrize("seed", range(3))
def test_tree_positions_match_reference_and_come_back(seed):
    s = _step(seed, R=6)
    g = torch.Generator().manual_seed(seed)
    pos0 = torch.randint(0, 1000, (s["T"] + 7,), generator=g)
    want = pos0.clone()
    off_want = tree_positions_ref(want, s["li"], s["exp_idx"], s["local"],
                                  s["req_depth"])
    got = _dev(pos0.clone())
    off = tree_positions(got, _dev(s["li"]), _dev(s["exp_idx"]),
                         _dev(s["local"]), _dev(s["req_depth"]))
    assert torch.equal(off.cpu(), off_want)
    assert torch.equal(got.cpu(), want)
    untree_positions(got, _dev(s["li"]), off)
    assert torch.equal(got.cpu(), pos0)


@pytest.mark.parametrize("B,W", [(1, 1), (16, 1), (130, 3)])
def test_store_trees_matches_index_copy(B, W):
    from vllm_jetspec.kernels.tree_verify import store_trees
    from vllm_jetspec.kernels.tree_verify_ref import store_trees_ref

    g = torch.Generator().manual_seed(B)
    R, S = 3, 7

    def rows():
        return (torch.randint(-1, B, (R, B), generator=g),
                torch.randint(0, 9, (R, B), generator=g),
                torch.randint(-2**40, 2**40, (R, B, W), generator=g),
                torch.randint(1, B + 1, (R,), generator=g))

    def states():
        return (torch.full((S, B), -1), torch.zeros(S, B, dtype=torch.long),
                torch.zeros(S, B, W, dtype=torch.long),
                torch.ones(S, dtype=torch.long))

    src = rows()
    idx = torch.tensor([5, 0, 3], dtype=torch.int32)
    want = states()
    store_trees_ref(idx, src, want)
    got = tuple(map(_dev, states()))
    store_trees(_dev(idx), tuple(map(_dev, src)), got)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("R,N,W,pad", [(1, 16, 1, 0), (5, 64, 1, 2),
                                       (3, 130, 3, 0)])
def test_tree_step_metadata_matches_reference(R, N, W, pad):
    """``pad``: rows of a CUDA graph's padded requests (no tree of their
    own: sequence length 0, query start = the step's end)."""
    from vllm_jetspec.kernels.tree_verify import tree_step_metadata
    from vllm_jetspec.kernels.tree_verify_ref import tree_step_metadata_ref

    g = torch.Generator().manual_seed(R * N)
    S = 8
    masks = torch.randint(-2**40, 2**40, (S, N, W), generator=g)
    idx = torch.randperm(S, generator=g)[:R].int()
    q = torch.randint(1, N + 1, (R,), generator=g)
    qsl = torch.cat([torch.zeros(1, dtype=torch.int32),
                     q.cumsum(0).int()])
    # a prefix of 0..40 tokens; one "sequence" shorter than its query (a
    # CUDA-graph warm-up's dummy lengths): its prefix is clamped at 0
    seq = (q + torch.randint(0, 41, (R,), generator=g)).int()
    seq[0] = max(0, int(q[0]) - 3)
    qsl = torch.cat([qsl, qsl[-1:].expand(pad)])
    seq = torch.cat([seq, torch.zeros(pad, dtype=torch.int32)])

    def bufs():
        return (torch.full((10, N, W), 7), torch.full((10,), -5,
                                                      dtype=torch.int32),
                torch.full((11,), -9, dtype=torch.int32),
                torch.full((10,), 7, dtype=torch.int32))

    want = bufs()
    tree_step_metadata_ref(masks, idx, seq, qsl, *want)
    got = tuple(map(_dev, bufs()))
    tree_step_metadata(_dev(masks), _dev(idx), _dev(seq), _dev(qsl), *got)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    # flags: 1 for the requests, 0 for padded rows, the rest untouched
    assert want[3].tolist() == [1] * R + [0] * pad + [7] * (10 - R - pad)
    assert int(want[1][0]) == 0


@pytest.mark.parametrize("queries", [
    [1],                        # a decode step
    [16, 16, 16],               # a draft pass: 16 slots a request
    [1, 130, 0, 7],             # a prefill chunk; a padded request
    [2000],                     # a long chunk: no rows, whatever its length
])
def test_chain_step_metadata_matches_reference(queries):
    """Steps without trees: the kernel writes what the builder's torch path
    writes (the reference) -- prefixes, query starts, tree flags 0 (the
    attention kernel computes chains) -- leaving the rest of each buffer
    alone; a sequence shorter than its query gets prefix 0."""
    from vllm_jetspec.kernels.tree_verify import chain_step_metadata
    from vllm_jetspec.kernels.tree_verify_ref import chain_step_metadata_ref

    R = len(queries)
    q = torch.tensor(queries)
    qsl = torch.cat([torch.zeros(1, dtype=torch.int32), q.cumsum(0).int()])
    seq = (q + torch.arange(R) * 37).int()
    seq[0] = max(0, int(q[0]) - 3)

    def bufs():
        return (torch.full((R + 2,), -5, dtype=torch.int32),
                torch.full((R + 3,), -9, dtype=torch.int32),
                torch.full((R + 2,), 7, dtype=torch.int32))

    want = bufs()
    chain_step_metadata_ref(qsl, seq, *want)
    got = tuple(map(_dev, bufs()))
    chain_step_metadata(_dev(qsl), _dev(seq), *got)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    assert int(want[0][0]) == 0
    assert want[2].tolist() == [0] * R + [7, 7]


def test_every_variant_compiles_for_sm90():
    """The interpreter runs what a compiled kernel may refuse: each kernel
    of this module compiles for an H100/H200 (Triton's own toolchain, no
    GPU needed), at a budget and depth of the shipped head's round."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.kernels.compile_check",
         "--budgets", "16", "--depths", "15"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sm_90: every variant compiled" in proc.stdout
    assert proc.stdout.count("ok   ") == 6
