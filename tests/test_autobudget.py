"""The load-adaptive budget policy (vllm_jetspec.autobudget), pure parts:
cost-model file and interpolation, expected tokens from path
probabilities, the choice (AR when drafts do not pay), calibration."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vllm_jetspec.autobudget import BudgetPolicy, CostModel


def cost():
    # Round time grows with budget x batch; AR steps cost 10 ms + 1 per req.
    return CostModel(ar_ms={1: 11.0, 8: 18.0},
                     round_ms={b: {1: 12.0 + 0.05 * b, 8: 20.0 + 1.0 * b}
                               for b in (4, 16, 64)})


def test_file_round_trip_and_errors(tmp_path):
    c = cost()
    c.draft_ms = {1: 3.0}
    c.save(str(tmp_path / "c.json"))
    d = CostModel.load(str(tmp_path / "c.json"))
    assert (d.ar_ms, d.round_ms, d.draft_ms) == (c.ar_ms, c.round_ms,
                                                 c.draft_ms)
    with pytest.raises(ValueError, match="does not exist"):
        CostModel.load(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="cost model"):
        CostModel.load(str(tmp_path / "bad.json"))
    raw = c.to_dict()
    raw["ar_ms"] = {"1": 0.0}
    (tmp_path / "zero.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="positive"):
        CostModel.load(str(tmp_path / "zero.json"))


def test_interpolation_in_batch():
    c = cost()
    assert c.ar(1) == 11.0 and c.ar(8) == 18.0
    assert c.ar(4) == pytest.approx(11.0 + 7.0 * 3 / 7)
    assert c.ar(15) == pytest.approx(25.0)          # extrapolated
    assert c.round(16, 8) == pytest.approx(36.0)


def tree_logp(p_per_depth, width=3):
    """cum_logp [1, N] of a chain-plus-siblings tree whose best path has
    the given per-depth probabilities (siblings much less likely)."""
    cum, out = 0.0, [0.0]
    for p in p_per_depth:
        cum += math.log(p)
        out += [cum] + [cum - 6.0] * (width - 1)
    return torch.tensor([out])


def test_expected_tokens_are_one_plus_top_path_probabilities():
    pol = BudgetPolicy(cost(), max_budget=64)
    cl = tree_logp([0.9] * 15)
    e = pol.expected_tokens(cl)
    p = cl[0, 1:].exp().sort(descending=True).values
    for b in (4, 16, 64):
        assert e[b] == pytest.approx(1 + float(p[:b - 1].sum()), rel=1e-5)
    assert pol.candidates == [4, 16, 64]
    assert BudgetPolicy(cost(), max_budget=16).candidates == [4, 16]
    with pytest.raises(ValueError, match="no budget"):
        BudgetPolicy(cost(), max_budget=3)


def test_choice_follows_load_and_falls_back_to_ar():
    pol = BudgetPolicy(cost(), max_budget=64)
    # A confident head with likely siblings (each 1 nat below the best).
    good = torch.cat([tree_logp([0.95] * 15)[:, :1], torch.tensor(
        [[math.log(0.95) * (1 + i // 4) - (i % 4 > 0) for i in range(60)]])],
        dim=1)
    e = pol.expected_tokens(good)
    best = {}
    for B in (1, 8):
        rates = {b: e[b] / cost().round(b, B) for b in (4, 16, 64)}
        best[B] = max(rates, key=rates.get)
        assert rates[best[B]] > 1 / cost().ar(B)
        assert pol.choose(good, B) == best[B]
    # Rounds at batch 1 cost little more than an AR step: the big tree
    # pays; at batch 8 round time grows with the budget: a smaller one.
    assert best[1] == 64 and best[8] < 64
    # A head that is never right: plain decoding.
    assert pol.choose(tree_logp([0.01] * 15), 8) == 1
    assert pol.choices == {64: 1, best[8]: 1, 1: 1}
    # A plain step of a jetspec engine also pays the draft pass: with an
    # expensive one, even a useless head's smallest tree beats it.
    c = cost()
    c.draft_ms = {1: 100.0, 8: 100.0}
    assert c.plain(8) == pytest.approx(118.0)
    assert BudgetPolicy(c, 64).choose(tree_logp([0.01] * 15), 8) == 4


def test_limit_climbs_one_candidate_per_step():
    """The largest budget a step may pick (and so the draft depth of a
    causal head) is one candidate above the last tree budget chosen; the
    first step may pick any; a plain step does not move the ladder."""
    pol = BudgetPolicy(cost(), max_budget=64)
    assert pol.next_limit() == 64
    good = tree_logp([0.95] * 15)
    assert pol.choose(tree_logp([0.01] * 15), 8, limit=64) == 1
    assert pol.next_limit() == 64
    assert pol.choose(good, 1, limit=4) == 4
    assert pol.next_limit() == 16
    assert pol.choose(tree_logp([0.01] * 15), 8, limit=16) == 1
    assert pol.next_limit() == 16         # not back to the first rung
    # The best budget at batch 1 (16 here: 64 adds only unlikely
    # siblings) is reached one rung per step from the smallest tree, and
    # kept.
    e = pol.expected_tokens(good)
    rates = {b: e[b] / cost().round(b, 1) for b in (4, 16, 64)}
    assert max(rates, key=rates.get) == 16
    pol = BudgetPolicy(cost(), max_budget=64)
    assert pol.choose(good, 1, limit=4) == 4
    assert [pol.choose(good, 1, limit=pol.next_limit())
            for _ in range(3)] == [16, 16, 16]
    assert pol.next_limit() == 64


def test_calibration_tracks_accepted_over_estimated():
    pol = BudgetPolicy(cost(), max_budget=64, ema=0.5)
    pol.observe(accepted=2.0, estimated=4.0)
    assert pol.calibration == pytest.approx(0.75)
    for _ in range(30):
        pol.observe(accepted=1.0, estimated=4.0)
    assert pol.calibration == pytest.approx(0.25, abs=1e-6)
    pol.observe(accepted=1.0, estimated=0.0)         # ignored
    assert pol.calibration == pytest.approx(0.25, abs=1e-6)


def test_cost_model_from_bench_rows():
    """AR step times from the runner's profile, or, for an AR row whose
    profile saw no step (the bench's CUDA engines without speculation,
    2026-11-25), from its output: one token per request per step."""
    seg = dict(draft_ms=2.0, tree_ms=0.5)
    rows = [dict(method="ar", budget=0, batch=1, round_ms=7.0, tokens=10,
                 seconds=1.0),
            dict(method="ar", budget=0, batch=8, round_ms=0.0, tokens=4096,
                 seconds=4.0),
            dict(method="jetspec", budget=16, batch=1, round_ms=16.0, **seg),
            dict(method="jetspec", budget=4, batch=1, round_ms=12.0, **seg),
            dict(method="auto", budget=16, batch=1, round_ms=1.0, **seg)]
    c = CostModel.from_bench_rows(rows)
    assert c.ar_ms == {1: 7.0, 8: pytest.approx(1e3 * 4.0 * 8 / 4096)}
    assert c.round_ms == {16: {1: 16.0}, 4: {1: 12.0}}
    assert c.draft_ms == {1: 2.5}
