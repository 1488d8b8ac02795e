"""The fused tree-build kernel equals the torch tree core: random per-depth
top-K log-probs with and without ties, -inf and NaN entries, every
algorithm, budgets 1-256 (masks of 1-4 words), widths 1-16, depths 1-16,
several requests. In Triton's interpreter without a GPU (budgets up to 80
there, see ``LARGE``)."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_jetspec.kernels.tree_build import build_tree_rows  # noqa: E402
from vllm_jetspec.kernels.tree_build_ref import (  # noqa: E402
    build_tree_rows_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.independent
NAMES = ("draft", "parents", "depth", "masks", "num_nodes")


def _inputs(R, D, K, seed, ties=False, holes=False, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    if ties:
        # Few distinct values: many equal path sums.
        logp = -torch.randint(0, 4, (R, D, K), generator=g).float() * 0.5
    else:
        logp = torch.randn(R, D, K, generator=g).abs().neg() * 2
    logp = logp.sort(-1, descending=True).values
    if holes:
        m = torch.rand(R, D, K, generator=g)
        logp[m < 0.15] = -math.inf
        logp[(m > 0.15) & (m < 0.2)] = math.nan
    ids = torch.stack([torch.randperm(vocab, generator=g)[:K]
                       for _ in range(R * D)]).view(R, D, K)
    anchor = torch.randint(0, vocab, (R,), generator=g)
    return logp, ids, anchor


def _check(logp, ids, anchor, budget, algo, layout="depth"):
    want = build_tree_rows_ref(logp, ids, anchor, budget, algo, layout)
    got = build_tree_rows(logp.to(DEV), ids.to(DEV), anchor.to(DEV),
                          budget, algo, layout=layout)
    for name, w, o in zip(NAMES, want, got):
        assert torch.equal(o.cpu(), w), (name, budget, algo, w, o.cpu())


ALGOS = ["accum_logp", "topb_prefix", "top2gap_fanout", "chain"]
# (budget, depth, width). Triton's interpreter runs tl.sort as Python
# steps (≈ 5 s a request at budget 16), so on CPU the small shapes, one
# draft-pass shape (every algorithm) and one of two mask words
# (accum_logp); on a GPU every shape below and algorithm, for all three
# kinds of inputs and 3 requests.
SMALL = [(4, 3, 2), (1, 4, 3), (2, 1, 1)]
LARGE = [(16, 15, 7), (80, 4, 5)]
GPU_ONLY = [(64, 8, 5), (128, 15, 7), (256, 16, 16)]
KINDS = [(False, False), (True, False), (False, True)]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("budget,D,K", SMALL)
def test_small_trees_match_reference(algo, budget, D, K):
    for seed, (ties, holes) in enumerate(KINDS):
        _check(*_inputs(3, D, K, 10 * budget + seed, ties, holes), budget,
               algo)


@pytest.mark.parametrize("algo,budget,D,K", [
    (a, *shape) for shape in LARGE + (GPU_ONLY if DEV == "cuda" else [])
    for a in ALGOS if DEV == "cuda" or shape[0] <= 16 or a == "accum_logp"])
def test_draft_pass_trees_match_reference(algo, budget, D, K):
    """On CPU one request with ties and holes together (-inf, NaN);
    on a GPU three requests of each kind."""
    if DEV == "cuda":
        for seed, (ties, holes) in enumerate(KINDS):
            _check(*_inputs(3, D, K, 10 * budget + seed, ties, holes),
                   budget, algo)
    else:
        _check(*_inputs(1, D, K, budget, ties=True, holes=True), budget,
               algo)


@pytest.mark.parametrize("algo,budget,D,K", [
    (a, *shape) for shape in SMALL + LARGE + GPU_ONLY for a in ALGOS
    if DEV == "cuda" or shape[0] <= 4 or (shape[0] <= 16 and
                                          a == "accum_logp")])
def test_best_first_layout_matches_reference(algo, budget, D, K):
    """``layout="best_first"`` (the V2 draft pass under ``tree_budget:
    "auto"``): the tree core's best-first trees, ties and holes included.
    On CPU the draft-pass shape for ``accum_logp`` only (interpreter)."""
    kinds = KINDS if DEV == "cuda" or budget <= 4 else [(True, True)]
    for seed, (ties, holes) in enumerate(kinds):
        _check(*_inputs(3 if budget <= 4 or DEV == "cuda" else 1, D, K,
                        10 * budget + seed, ties, holes), budget, algo,
               layout="best_first")


def test_ties_on_rows_wider_than_1024():
    """Equal path sums on a depth with more than 1024 candidates (79 x 16):
    the torch core picked among them with a topk there until 2026-12-03 and
    built another tree than the kernel (budget 256 on the H200); both now
    break ties the same way, shallower then earlier."""
    _check(*_inputs(1, 3, 16, 5, ties=True), 80, "topb_prefix")


def test_writes_into_given_rows():
    """The draft pass hands views of its buffers and no anchor: rows past R
    untouched."""
    logp, ids, anchor = _inputs(2, 3, 3, 3)
    B = 6
    bufs = (torch.full((4, B - 1), 99, dtype=torch.long, device=DEV),
            torch.full((4, B), 99, dtype=torch.long, device=DEV),
            torch.full((4, B), 99, dtype=torch.long, device=DEV),
            torch.full((4, B, 1), 99, dtype=torch.long, device=DEV),
            torch.full((4,), 99, dtype=torch.long, device=DEV))
    build_tree_rows(logp.to(DEV), ids.to(DEV), None, B,
                    out=tuple(b[:2] for b in bufs))
    want = build_tree_rows_ref(logp, ids, anchor, B)
    for b, w in zip(bufs, want):
        assert torch.equal(b[:2].cpu(), w)
        assert (b[2:] == 99).all()
    with pytest.raises(ValueError, match="contiguous int64"):
        build_tree_rows(logp.to(DEV), ids.to(DEV), anchor.to(DEV), B,
                        out=tuple(b[:2, :-1] if b.dim() > 1 else b[:2]
                                  for b in bufs))
