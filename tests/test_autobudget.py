"""The load-adaptive budget policy (vllm_jetspec.autobudget), pure parts:
cost-model file and interpolation, expected tokens from path
probabilities, the choice (AR when drafts do not pay), calibration."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vllm_jetspec.autobudget import (BudgetPolicy, CostModel,
                                      ObservedBudgetPolicy)


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


# -- tree_budget "auto" on vLLM's V2 runner (ObservedBudgetPolicy) ----------

def v2_cost():
    c = cost()
    c.draft_ms = {1: 1.0, 8: 2.0}
    c.tau = {4: 2.5, 16: 4.0, 64: 5.0}
    return c


def test_tau_round_trip_from_rows_and_errors(tmp_path):
    """``tau`` (tokens per round by budget) goes through the file; from
    bench rows it is the mean over batch sizes weighted by rounds; a file
    without it loads (older files) with an empty one; tau < 1 is refused."""
    c = v2_cost()
    c.save(str(tmp_path / "c.json"))
    assert CostModel.load(str(tmp_path / "c.json")).tau == c.tau
    raw = c.to_dict()
    del raw["tau"]
    (tmp_path / "old.json").write_text(json.dumps(raw))
    assert CostModel.load(str(tmp_path / "old.json")).tau == {}
    raw["tau"] = {"4": 0.5}
    (tmp_path / "low.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="tau"):
        CostModel.load(str(tmp_path / "low.json"))
    seg = dict(draft_ms=2.0, tree_ms=0.5)
    rows = [dict(method="ar", budget=0, batch=1, round_ms=7.0),
            dict(method="jetspec", budget=16, batch=1, round_ms=16.0,
                 steps=30, tau=3.0, **seg),
            dict(method="jetspec", budget=16, batch=8, round_ms=20.0,
                 steps=10, tau=4.0, **seg),
            dict(method="auto", budget=16, batch=1, round_ms=1.0, steps=9,
                 tau=9.0, **seg)]
    # 30 rounds of 1 request at 3.0, 10 rounds of 8 at 4.0
    assert CostModel.from_bench_rows(rows).tau == {
        16: pytest.approx((30 * 3.0 + 80 * 4.0) / 110)}


def test_observed_policy_needs_tau():
    with pytest.raises(ValueError, match="tau"):
        ObservedBudgetPolicy(cost(), 64)
    c = v2_cost()
    c.tau = {4: 2.5}
    with pytest.raises(ValueError, match="no budget with tau"):
        ObservedBudgetPolicy(c, 2)
    assert ObservedBudgetPolicy(c, 64).candidates == [4]


def test_observed_policy_rates_trees_against_plain_steps():
    """rate(b) = (1 + c (tau(b) - 1)) / round(b, B) against 1 / (AR +
    draft pass): the biggest tree at batch 1, 16 at batch 2-8 (64's round
    grows faster), plain steps at batch 8 once acceptance drops to a
    tenth of the benchmark's."""
    p = ObservedBudgetPolicy(v2_cost(), 64)
    assert [p.best(B)[0] for B in (1, 2, 4, 8)] == [64, 16, 16, 16]
    assert p.best(1)[1] == pytest.approx(5.0 / (12.0 + 0.05 * 64))
    assert ObservedBudgetPolicy(v2_cost(), 16).best(1)[0] == 16
    p.calibration = 0.1
    assert p.best(8) == (1, pytest.approx(1 / (18.0 + 2.0)))
    assert p.best(1)[0] == 16          # 1.3 / 12.8 > 1.4 / 15.2, 1 / 12


def test_observed_policy_falls_back_probes_and_recovers():
    """With nothing accepted (calibration -> 0) the policy picks plain
    steps, runs a probe round after ``probe_every`` of them, then waits
    twice as long (up to the cap); when probes show acceptance again,
    trees come back and the wait resets."""
    p = ObservedBudgetPolicy(v2_cost(), 64, ema=0.5, probe_every=4,
                             max_probe_every=16)
    assert p.choose(1) == 64
    for _ in range(12):
        p.observe(64, [1, 1])          # nothing accepted
    assert p.calibration < 0.01
    picks = [p.choose(1) for _ in range(60)]
    probes = [i for i, b in enumerate(picks) if b > 1]
    # waits of 4, 8, 16, 16 plain steps between probes
    assert [b - a for a, b in zip([-1] + probes, probes)] == [5, 9, 17, 17]
    assert p.probes == 4 and p.choices[1] == 56
    for _ in range(12):
        p.observe(64, [5, 5])          # tau 5 again
    assert p.calibration == pytest.approx(1.0, abs=1e-3)
    assert p.choose(1) == 64 and p._interval == 4


def test_observed_policy_ignores_unknown_budgets_and_empty_steps():
    p = ObservedBudgetPolicy(v2_cost(), 64)
    p.observe(7, [1, 1])               # cut near max_model_len: no tau
    p.observe(16, [])
    assert p.calibration == 1.0
    p.observe(16, [2, 4])              # 2 accepted of 3 expected
    assert p.calibration == pytest.approx(1.0 + 0.1 * (2 / 3 - 1.0))


def test_observed_step_times_rescale_the_cost_model():
    """Plain steps of a jetspec engine run the head's draft pass too,
    which a cost model measured on V2 does not split out (H200,
    2026-12-04, SmolLM2 batch 1: 3.3 ms against AR's 1.9, and the
    unscaled policy chose plain steps at 0.59 x AR): the observed times
    scale each choice's cost, and the choice moves to trees."""
    c = v2_cost()
    c.draft_ms = {}
    c.ar_ms = {1: 2.0, 8: 6.0}
    c.round_ms = {b: {1: 12.0, 8: 20.0} for b in (4, 16, 64)}
    p = ObservedBudgetPolicy(c, 64, ema=0.5)
    assert p.best(1)[0] == 1               # 1/2 > 5/12
    for _ in range(20):
        p.observe_time(1, 1, 6.0)          # plain steps really take 6 ms
    assert p.time_scale["plain"] == pytest.approx(6.0 / 2.0, rel=1e-3)
    assert p.best(1)[0] == 64              # 5/12 > 1/6
    p.observe_time(1, 1, 1e6)              # a pause: at most 4 x
    assert p.time_scale["plain"] < 4.0
    p.observe_time(7, 1, 3.0)              # no such budget: ignored
    p.observe_time(16, 1, float("nan"))
    assert set(p.time_scale) == {"plain"}


def test_tree_rounds_share_one_time_scale():
    """A machine slower than the file's makes the running budget look
    slower than the model; with one factor per budget the others (not
    seen) looked cheaper and the policy drifted to larger trees (H200,
    2026-12-04, SmolLM2: 32 at batch 1 where 8 was best). Every tree
    budget shares the factor, so their ranking stays the file's."""
    c = v2_cost()
    p = ObservedBudgetPolicy(c, 64, ema=0.5)
    ranking = p.best(2)[0]
    for _ in range(20):
        p.observe_time(ranking, 2, 1.3 * c.round(ranking, 2))
    assert p.time_scale == {"tree": pytest.approx(1.3, rel=1e-3)}
    assert p.best(2)[0] == ranking


def test_run_a_numbers_through_the_shared_factor_policy():
    """H200, 2026-12-04 (docs/autobudget.md, run A): the cost model that
    run wrote, and its measured plain step of a jetspec engine (6.72 s for
    2048 tokens in 2025 steps, 2008 of them plain, at batch 1: 3.3 ms).
    The first policy took plain steps at batch 1 (0.59 x AR); with the
    plain factor learned from those steps the choice is budget 8, the
    best static budget of that run at batch 1, 8 and 32 (a prediction
    from measured inputs, not a measurement of the policy)."""
    from pathlib import Path

    path = Path(__file__).parents[1] / "docs" / "data" / \
        "cost_model_smollm2_h200_2026-12-04.json"
    p = ObservedBudgetPolicy(CostModel.load(str(path)), 32)
    # The file alone: budget 8 and plain nearly tie at batch 1 (0.5205
    # against 0.5180 tokens/ms); at run A's calibration (0.96) plain wins.
    p.calibration = 0.9604513200656987
    assert p.best(1)[0] == 1
    for _ in range(50):
        p.observe_time(1, 1, 1e3 * 6.722781578 / 2025)
    assert [p.best(B)[0] for B in (1, 8, 32)] == [8, 8, 8]


def test_has_tau(tmp_path):
    from vllm_jetspec.autobudget import has_tau

    v2_cost().save(str(tmp_path / "new.json"))
    cost().save(str(tmp_path / "old.json"))
    assert has_tau(str(tmp_path / "new.json"))
    assert not has_tau(str(tmp_path / "old.json"))
    with pytest.raises(ValueError, match="does not exist"):
        has_tau(str(tmp_path / "none.json"))
