"""``"tree_budget": "auto"``: choose each step's tree budget from the load.

Per step, for the current batch size ``B`` and every candidate budget ``b``
(the budgets the cost model has, up to ``tree_budget_max``), the policy
estimates

    rate(b) = E[tokens per request per round | b] / T(b, B)

and picks the best, or plain decoding (no drafts) when
``1 / (T_AR(B) + T_draft(B))`` is higher: a plain step of a jetspec engine
still runs the head (its draft pass writes the head's context K/V of the
step's tokens, which later trees need, and gives the next step's
estimate). Pure python/torch, no vLLM import.

- ``T(b, B)``: round time of jetspec at budget ``b`` and of plain decoding
  at batch size ``B``, from a cost-model file that
  ``python -m vllm_jetspec.tools.bench`` writes (``cost_model.json``: measured on
  the device and model it will serve), linearly interpolated in ``B``
  between measured batch sizes (and extrapolated from the last two).
- ``E[tokens | b]``: 1 (the bonus token) plus the expected accepted drafts.
  The head's own estimate of the probability that a node is accepted is
  its path probability ``exp(cum_logp)``; with an accum_logp tree, the
  tree of budget ``b`` is the ``b - 1`` most probable nodes of the largest
  one, so the estimate is ``sum of the top b - 1 path probabilities``
  (averaged over the batch's requests). Heads are miscalibrated, so the
  estimate is scaled by a running calibration factor: accepted drafts
  divided by the estimate for the nodes that were actually verified
  (exponential moving average over rounds; starts at 1).

Lossless whatever it picks: every budget is verified as usual.

That policy runs in the V1 runner's hooks, which pick the budget of a step
after its draft pass. On vLLM's V2 runner (CUDA, async scheduling) the
scheduler fixes a step's draft slots before the trees exist, one count for
the whole batch; ``ObservedBudgetPolicy`` chooses there, from the batch size
and the acceptance the scheduler has seen (one step late):

    rate(b) = (1 + c * (tau(b) - 1)) / T(b, B)

with ``tau(b)`` the tokens per round the cost model's benchmark measured at
each budget (``tau`` in the file) and ``c`` a running calibration: accepted
drafts per round over ``tau(b) - 1`` at the budget that ran. Step times are
calibrated the same way: the scheduler times its steps (the interval
between two outputs, decode steps only), and the plain step's cost and the
tree rounds' costs are each scaled by observed over modelled - one factor
for plain steps (whatever a plain step of a jetspec engine costs beyond
the file's AR step: H200, 2026-12-04, SmolLM2 batch 1, 3.3 ms against the
AR row's 1.9, when it still ran the head's draft pass, skipped since:
``v2.speculator``) and one
shared by every tree budget (a slower or faster machine than the file's;
one factor per budget made the budgets not yet seen look cheaper than the
one running, and the policy drifted to larger trees: same day, batch 8,
0.88 x AR against 1.04 x). When plain
steps win it still runs one probe round now and then (every
``probe_every`` steps, doubling while probes keep losing) so it sees when
trees pay again.

Without a cost model (``tree_budget: "auto"`` alone) ``OnlineBudgetPolicy``
measures both sides itself: per budget (and plain steps) the tokens each
request emits per step and, per batch-size bucket, the step time (the
scheduler's clock on V2; ``OnlineRoundPolicy`` times the V1 hooks' steps);
it tries every budget a few steps first, then runs the best, and probes the
others now and then.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

COST_FORMAT = "jetspec-cost-v1"


@dataclass
class CostModel:
    ar_ms: dict[int, float]                  # batch -> ms per step
    round_ms: dict[int, dict[int, float]]    # budget -> batch -> ms
    meta: dict = field(default_factory=dict)
    # batch -> ms of the head's draft pass (+ tree) per step; 0 if unknown
    draft_ms: dict[int, float] = field(default_factory=dict)
    # budget -> tokens per request and round the benchmark measured there
    # (1 + accepted drafts); empty in files written before 2026-12-04
    tau: dict[int, float] = field(default_factory=dict)

    @staticmethod
    def _interp(points: dict[int, float], B: int) -> float:
        xs = sorted(points)
        if B in points:
            return points[B]
        if len(xs) == 1:
            return points[xs[0]] * max(1.0, B / xs[0])
        if B < xs[0]:
            lo, hi = xs[0], xs[1]
        elif B > xs[-1]:
            lo, hi = xs[-2], xs[-1]
        else:
            hi = next(x for x in xs if x > B)
            lo = max(x for x in xs if x < B)
        y = points[lo] + (points[hi] - points[lo]) * (B - lo) / (hi - lo)
        return max(y, 1e-9)

    def ar(self, B: int) -> float:
        return self._interp(self.ar_ms, B)

    def plain(self, B: int) -> float:
        """A plain step of a jetspec engine: AR + the draft pass."""
        return self.ar(B) + (self._interp(self.draft_ms, B)
                             if self.draft_ms else 0.0)

    def round(self, budget: int, B: int) -> float:
        return self._interp(self.round_ms[budget], B)

    @property
    def budgets(self) -> list[int]:
        return sorted(self.round_ms)

    def to_dict(self) -> dict:
        return dict(format=COST_FORMAT, meta=self.meta,
                    ar_ms={str(k): v for k, v in self.ar_ms.items()},
                    draft_ms={str(k): v for k, v in self.draft_ms.items()},
                    tau={str(b): v for b, v in self.tau.items()},
                    round_ms={str(b): {str(k): v for k, v in d.items()}
                              for b, d in self.round_ms.items()})

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "CostModel":
        """Raises ``ValueError`` with one clear message on a bad file."""
        if not os.path.isfile(path):
            raise ValueError(f"jetspec: cost model {path!r} does not exist "
                             "(python -m vllm_jetspec.tools.bench writes one)")
        try:
            with open(path) as f:
                raw = json.load(f)
            if raw.get("format") != COST_FORMAT:
                raise ValueError("format")
            ar = {int(k): float(v) for k, v in raw["ar_ms"].items()}
            rounds = {int(b): {int(k): float(v) for k, v in d.items()}
                      for b, d in raw["round_ms"].items()}
            draft = {int(k): float(v)
                     for k, v in (raw.get("draft_ms") or {}).items()}
            tau = {int(k): float(v)
                   for k, v in (raw.get("tau") or {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) \
                as e:
            raise ValueError(f"jetspec: {path!r} is not a {COST_FORMAT} "
                             f"cost model ({e})") from None
        if not ar or not rounds or any(not d for d in rounds.values()) or \
                any(v <= 0 for v in ar.values()) or any(
                    v <= 0 for d in rounds.values() for v in d.values()):
            raise ValueError(f"jetspec: cost model {path!r} needs positive "
                             "AR and round times for at least one budget")
        if any(v < 0 for v in draft.values()):
            raise ValueError(f"jetspec: cost model {path!r}: negative "
                             "draft_ms")
        if any(not (v >= 1.0 and math.isfinite(v)) for v in tau.values()):
            raise ValueError(f"jetspec: cost model {path!r}: tau (tokens "
                             "per round) must be >= 1")
        return cls(ar, rounds, raw.get("meta") or {}, draft, tau)

    @classmethod
    def from_bench_rows(cls, rows: list[dict], meta: dict | None = None
                        ) -> "CostModel":
        """From ``bench`` rows (method 'ar' and 'jetspec', not replayed)."""
        # An AR row without a step count (the runner's profile saw no
        # step: on CUDA, vLLM 0.26 runs engines without speculation on its
        # V2 model runner, vllm/v1/worker/gpu/model_runner.py (the AR trace
        # of 2026-11-25), which our V1-runner hooks do not see) times its
        # steps from its output: every step emits one token per request.
        ar = {r["batch"]: r["round_ms"] if r["round_ms"] > 0 else
              1e3 * r["seconds"] * r["batch"] / r["tokens"] for r in rows
              if r["method"] == "ar" and (r["round_ms"] > 0 or (
                  r.get("tokens") and r.get("seconds")))}
        rounds: dict[int, dict[int, float]] = {}
        draft: dict[int, float] = {}
        rounds_at: dict[int, float] = {}     # budget -> rounds measured
        tokens_at: dict[int, float] = {}     # budget -> tokens of those
        for r in sorted(rows, key=lambda r: -r["budget"]):
            if r["method"] == "jetspec" and r["round_ms"] > 0:
                rounds.setdefault(r["budget"], {})[r["batch"]] = r["round_ms"]
                # The smallest budget's draft pass (it ends up last).
                draft[r["batch"]] = r["draft_ms"] + r["tree_ms"]
                # tau over every batch size, weighted by its rounds (the
                # acceptance does not depend on the batch; greedy rows)
                n = float(r.get("steps") or 0) * r["batch"]
                if r.get("tau") and n > 0:
                    rounds_at[r["budget"]] = rounds_at.get(r["budget"], 0) + n
                    tokens_at[r["budget"]] = tokens_at.get(r["budget"], 0) \
                        + n * float(r["tau"])
        tau = {b: tokens_at[b] / rounds_at[b] for b in rounds_at}
        return cls(ar, rounds, meta or {}, draft, tau)


def has_tau(path: str) -> bool:
    """Whether a cost-model file carries the measured tokens per round
    that ``ObservedBudgetPolicy`` (``auto`` on vLLM's V2 runner) needs;
    ``bench`` writes them since 2026-12-04. Raises ``ValueError`` on a bad
    file, as ``CostModel.load``."""
    return bool(CostModel.load(path).tau)


class BudgetPolicy:
    """Picks a budget per step; learns the head's calibration online."""

    def __init__(self, cost: CostModel, max_budget: int,
                 ema: float = 0.05):
        self.cost = cost
        self.candidates = [b for b in cost.budgets if 2 <= b <= max_budget]
        if not self.candidates:
            raise ValueError(
                f"jetspec: the cost model has no budget in [2, {max_budget}]"
                f" (it has {cost.budgets})")
        self.ema = ema
        self.calibration = 1.0
        self.choices: dict[int, int] = {}     # budget -> steps (1 = AR)
        self.last = self.candidates[-1]       # the previous step's choice

    def next_limit(self) -> int:
        """The largest budget this step may pick: one candidate above the
        last tree budget chosen (the largest at first; plain steps do not
        count). A causal head then
        drafts only ``limit - 1`` slots: trees of every budget up to the
        limit are exactly those of a full-depth draft (a tree of ``b``
        nodes is at most ``b - 1`` deep), and the draft pass costs what a
        static engine at that budget pays, not the largest budget's."""
        above = [b for b in self.candidates if b > self.last]
        return above[0] if above else self.candidates[-1]

    def expected_tokens(self, cum_logp: torch.Tensor) -> dict[int, float]:
        """``cum_logp`` [R, N]: path log-probs of the largest tree's nodes
        (root at 0, padding -inf). Expected tokens per request per round
        for every candidate budget."""
        p = cum_logp[:, 1:].float().exp().nan_to_num(0.0)
        p = p.sort(dim=1, descending=True).values.mean(0)
        cum = torch.cat([p.new_zeros(1), p.cumsum(0)]).tolist()
        return {b: 1.0 + self.calibration * cum[min(b - 1, len(cum) - 1)]
                for b in self.candidates}

    def choose(self, cum_logp: torch.Tensor, batch: int,
               limit: int | None = None) -> int:
        """The budget for this step (1: plain decoding), at most
        ``limit``."""
        best, best_rate = 1, 1.0 / self.cost.plain(batch)
        for b, e in self.expected_tokens(cum_logp).items():
            if limit is not None and b > limit:
                continue
            rate = e / self.cost.round(b, batch)
            if rate > best_rate:
                best, best_rate = b, rate
        self.choices[best] = self.choices.get(best, 0) + 1
        if best > 1:
            # A plain step leaves the ladder where it was: a low estimate
            # of one step (a prefill's draft, one hard token) must not send
            # the next rounds back to the smallest trees (a request then
            # needs one round per rung to climb back: on the H100, 8B
            # shape, replay, a fifth of the rounds of 128-token requests,
            # 2026-11-25).
            self.last = best
        return best

    def observe(self, accepted: float, estimated: float,
                requests: int = 0) -> None:
        """After verification: drafts accepted and their estimate
        (sum of path probabilities of the verified nodes), summed over the
        step's ``requests`` trees."""
        if estimated <= 0 or not math.isfinite(estimated):
            return
        ratio = accepted / estimated
        self.calibration += self.ema * (ratio - self.calibration)


class ObservedBudgetPolicy:
    """The tree budget of each step on vLLM's V2 runner, chosen by its
    scheduler before the step's trees exist (one budget for the batch;
    1 = a plain step). Pure python: the scheduler calls ``choose(batch)``
    when it sets the next step's draft slots and ``observe(budget,
    emitted)`` with each verified step's tokens per request."""

    def __init__(self, cost: CostModel, max_budget: int, ema: float = 0.1,
                 probe_every: int = 16, max_probe_every: int = 256):
        if not cost.tau:
            raise ValueError(
                "jetspec: tree_budget 'auto' on vLLM's V2 runner needs the "
                "measured tokens per round ('tau') in the cost model: run "
                "python -m vllm_jetspec.tools.bench again (it writes "
                "cost_model.json; files before 2026-12-04 lack tau)")
        self.cost = cost
        self.candidates = [b for b in cost.budgets
                           if 2 <= b <= max_budget and b in cost.tau]
        if not self.candidates:
            raise ValueError(
                f"jetspec: the cost model has no budget with tau in "
                f"[2, {max_budget}] (it has {cost.budgets}, tau for "
                f"{sorted(cost.tau)})")
        self.ema = ema
        self.calibration = 1.0
        self.probe_every = probe_every
        self.max_probe_every = max_probe_every
        self._interval = probe_every    # plain steps before the next probe
        self._plain_run = 0             # plain steps chosen in a row
        self.choices: dict[int, int] = {}     # budget -> steps (1: plain)
        self.probes = 0
        # "plain" / "tree" -> observed over modelled step time
        self.time_scale: dict[str, float] = {}

    def expected_tokens(self, budget: int) -> float:
        return 1.0 + self.calibration * (self.cost.tau[budget] - 1.0)

    def modelled_ms(self, budget: int, batch: int) -> float:
        """The cost model's step time (1: a plain step)."""
        return self.cost.plain(batch) if budget == 1 else \
            self.cost.round(budget, batch)

    @staticmethod
    def _kind(budget: int) -> str:
        return "plain" if budget == 1 else "tree"

    def step_ms(self, budget: int, batch: int) -> float:
        """Step time: the cost model's, scaled by what was observed."""
        return self.modelled_ms(budget, batch) * \
            self.time_scale.get(self._kind(budget), 1.0)

    def best(self, batch: int) -> tuple[int, float]:
        """(budget, tokens per ms) of the best choice for ``batch``
        requests under the current calibration; budget 1: plain steps."""
        best, best_rate = 1, 1.0 / self.step_ms(1, batch)
        for b in self.candidates:
            rate = self.expected_tokens(b) / self.step_ms(b, batch)
            if rate > best_rate:
                best, best_rate = b, rate
        return best, best_rate

    def best_tree(self, batch: int) -> int:
        return max(self.candidates, key=lambda b: self.expected_tokens(b)
                   / self.step_ms(b, batch))

    def observe_time(self, budget: int, batch: int, ms: float) -> None:
        """A decode step of ``batch`` requests at ``budget`` (1: plain)
        took ``ms`` (wall time between two outputs). One step's ratio to
        the model is clamped to [1/4, 4] (a pause between requests is not
        a step time)."""
        if budget != 1 and budget not in self.cost.round_ms:
            return
        if not (ms > 0 and math.isfinite(ms)) or batch < 1:
            return
        ratio = min(4.0, max(0.25, ms / self.modelled_ms(budget, batch)))
        kind = self._kind(budget)
        old = self.time_scale.get(kind, 1.0)
        self.time_scale[kind] = old + self.ema * (ratio - old)

    def choose(self, batch: int) -> int:
        """The budget of the next step for ``batch`` requests."""
        best, _ = self.best(max(1, batch))
        if best == 1:
            self._plain_run += 1
            if self._plain_run > self._interval:
                # A probe: one round of the best tree, to learn whether
                # trees pay again; the next wait is twice as long.
                self._plain_run = 0
                self._interval = min(2 * self._interval,
                                     self.max_probe_every)
                self.probes += 1
                best = self.best_tree(max(1, batch))
        else:
            self._plain_run = 0
            self._interval = self.probe_every
        self.choices[best] = self.choices.get(best, 0) + 1
        return best

    def observe(self, budget: int, emitted: list[int]) -> None:
        """A verified step at ``budget``: tokens each request emitted
        (accepted drafts + 1). Budgets the policy does not know (a request
        the scheduler cut near ``max_model_len``) and empty steps teach
        nothing."""
        if budget not in self.cost.tau or not emitted:
            return
        prior = self.cost.tau[budget] - 1.0
        if prior <= 0:
            return
        ratio = (sum(emitted) / len(emitted) - 1.0) / prior
        self.calibration += self.ema * (max(0.0, ratio) - self.calibration)


# Budgets ``tree_budget: "auto"`` chooses among without a cost model (up to
# tree_budget_max, default the largest).
ONLINE_BUDGETS = (4, 8, 16, 32, 64)


def online_budgets(budget_max: int) -> list[int]:
    """What ``tree_budget: "auto"`` without a cost model chooses among: the
    ``ONLINE_BUDGETS`` below ``budget_max`` (``tree_budget_max``), and
    ``budget_max``."""
    return sorted({b for b in ONLINE_BUDGETS if b < budget_max}
                  | {budget_max})


def batch_bucket(batch: int) -> int:
    """The power of two at or below ``batch``: step times are kept per
    bucket (a step's time grows with the batch)."""
    return 1 << (max(1, batch).bit_length() - 1)


class OnlineBudgetPolicy:
    """``tree_budget: "auto"`` without a cost model: the same interface as
    ``ObservedBudgetPolicy`` (on vLLM's V2 runner the scheduler calls
    ``choose``, ``observe`` and ``observe_time``; on V1 the hooks, through
    ``OnlineRoundPolicy``), everything measured while serving. Per arm (a candidate budget, or 1 = a plain step):

    - ``tokens[a]``: tokens a request emits per step at ``a`` (accepted
      drafts + 1; 1 for plain steps), a moving average over steps; an arm
      not seen for a while starts again from a plain mean of its next
      steps (its old average may be from other traffic);
    - ``ms[a, bucket]``: the step's wall time for the batch-size bucket,
      from the scheduler's clock (``v2.auto.StepClock``: only steps whose
      predecessor ran the same arm and batch are timed); a bucket without
      it borrows the nearest bucket's, scaled by the plain steps' times.

    A step runs the arm with the most tokens per ms. An arm not yet
    measured (no tokens, no time in any bucket; or the plain step's time
    in this bucket) is tried first, ``run`` steps in a row (the clock
    times a step only after one of the same arm), then left ``LAG`` steps
    for its data to arrive (the scheduler sees a step's outputs a step or
    two after choosing the next); after ``max_tries`` runs in a bucket
    without data, one run per ``max_probe_every`` steps. Then every
    ``probe_every`` steps
    (doubling while the best arm stays the best, up to
    ``max_probe_every``) the arm chosen longest ago runs ``run`` steps, so
    a change of traffic (greedy to sampled, another kind of prompt) is
    seen. Lossless whatever it picks: trees are verified as usual."""

    # Steps a run's observations may arrive after it was chosen (async
    # scheduling: outputs reach the scheduler a step or two late; more
    # with pipeline parallelism).
    LAG = 4

    def __init__(self, candidates, ema: float = 0.1, run: int = 3,
                 probe_every: int = 16, max_probe_every: int = 256,
                 max_tries: int = 3):
        self.candidates = sorted({int(b) for b in candidates if b >= 2})
        if not self.candidates:
            raise ValueError("jetspec: tree_budget 'auto' needs a budget "
                             "of at least 2 to choose from")
        self.ema = ema
        self.run = run
        self.max_tries = max_tries
        # (arm, bucket) -> steps at which exploration runs of it began
        self._tries: dict[tuple[int, int], list[int]] = {}
        self.probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.tokens: dict[int, float] = {1: 1.0}
        self._count: dict[int, int] = {}     # steps in the current average
        self.ms: dict[tuple[int, int], float] = {}
        self._seen: dict[int, int] = {}      # arm -> step of its last data
        self._chosen: dict[int, int] = {}    # arm -> step it last ran
        self._step = 0
        self._current: int | None = None     # arm of a run in progress
        self._left = 0                       # its steps still to go
        self._interval = probe_every
        self._since_probe = 0
        self._last_best: int | None = None
        self.choices: dict[int, int] = {}    # budget -> steps (1: plain)
        self.probes = 0

    @property
    def arms(self) -> list[int]:
        return [1, *self.candidates]

    @property
    def calibration(self) -> float:
        """Accepted drafts per step at the best-measured tree arm, for the
        bench's report (``ObservedBudgetPolicy``'s head calibration has no
        counterpart here)."""
        seen = [self.tokens[b] for b in self.candidates if b in self.tokens]
        return max(seen) - 1.0 if seen else 0.0

    def step_ms(self, arm: int, bucket: int) -> float | None:
        """Step time at ``arm`` in ``bucket``: measured there, else from
        the nearest bucket that has it, scaled by the plain step's times
        in both buckets where known; None if never timed."""
        if (arm, bucket) in self.ms:
            return self.ms[arm, bucket]
        have = [k for (a, k) in self.ms if a == arm]
        if not have:
            return None
        near = min(have, key=lambda k: (abs(k.bit_length()
                                            - bucket.bit_length()), k))
        ms = self.ms[arm, near]
        if (1, bucket) in self.ms and (1, near) in self.ms:
            ms *= self.ms[1, bucket] / self.ms[1, near]
        return ms

    def rate(self, arm: int, batch: int) -> float | None:
        """Tokens per request per ms at ``arm`` for ``batch`` requests,
        or None while not measured."""
        ms = self.step_ms(arm, batch_bucket(batch))
        if arm not in self.tokens or ms is None:
            return None
        return self.tokens[arm] / ms

    def best(self, batch: int) -> tuple[int, float]:
        """(arm, tokens per ms) of the best measured arm for ``batch``;
        nothing measured: the largest budget (what a static engine runs),
        rate 0."""
        rates = {a: r for a in self.arms
                 if (r := self.rate(a, batch)) is not None}
        if not rates:
            return self.candidates[-1], 0.0
        arm = max(rates, key=rates.get)
        return arm, rates[arm]

    def _unmeasured(self, bucket: int) -> list[int]:
        """Arms with no tokens or no time yet, and the plain step if it
        has no time in ``bucket`` (the rates there lean on it), that may
        be tried now: not while a run's data may still be coming (``run +
        LAG`` steps after its start), and after ``max_tries`` runs only
        one per ``max_probe_every`` steps (a batch that changes bucket
        every step leaves the clock nothing to time)."""
        todo = [a for a in self.arms
                if a not in self.tokens or self.step_ms(a, bucket) is None]
        if not todo and (1, bucket) not in self.ms:
            todo = [1]
        ready = []
        for a in todo:
            starts = self._tries.get((a, bucket), [])
            wait = self.run + self.LAG if len(starts) < self.max_tries \
                else self.max_probe_every
            if not starts or self._step - starts[-1] > wait:
                ready.append(a)
        return ready

    def choose(self, batch: int) -> int:
        """The arm of the next step for ``batch`` requests."""
        self._step += 1
        bucket = batch_bucket(batch)
        if self._left > 0:                   # a run in progress
            self._left -= 1
            arm = self._current
        elif (todo := self._unmeasured(bucket)):
            arm = todo[0]
            self._tries.setdefault((arm, bucket), []).append(self._step)
            self._current, self._left = arm, self.run - 1
        else:
            arm, rate = self.best(batch)
            if rate == 0.0:
                # nothing to compare (no step timed yet): a static
                # engine's choice, no probes
                self._chosen[arm] = self._step
                self.choices[arm] = self.choices.get(arm, 0) + 1
                return arm
            if arm != self._last_best:
                self._interval = self.probe_every
            self._last_best = arm
            self._since_probe += 1
            if self._since_probe > self._interval:
                self._since_probe = 0
                self._interval = min(2 * self._interval,
                                     self.max_probe_every)
                others = [a for a in self.arms if a != arm]
                arm = min(others, key=lambda a: self._chosen.get(a, -1))
                self._current, self._left = arm, self.run - 1
                self.probes += 1
        self._chosen[arm] = self._step
        self.choices[arm] = self.choices.get(arm, 0) + 1
        return arm

    def observe(self, budget: int, emitted: list[int]) -> None:
        """A verified step at ``budget``: tokens each request emitted."""
        if budget not in self.candidates or not emitted:
            return
        mean = sum(emitted) / len(emitted)
        # An arm not seen for a while (a probe) starts its average again
        # (its old one may be from other traffic): a plain mean over its
        # first steps, the moving average after that.
        stale = self._step - self._seen.get(budget, self._step) > \
            self.probe_every
        n = 0 if budget not in self.tokens or stale else \
            self._count.get(budget, 0)
        self._count[budget] = n + 1
        w = max(self.ema, 1.0 / (n + 1))
        old = self.tokens.get(budget, mean)
        self.tokens[budget] = old + w * (mean - old)
        self._seen[budget] = self._step

    def observe_time(self, budget: int, batch: int, ms: float) -> None:
        """A decode step of ``batch`` requests at ``budget`` (1: plain)
        took ``ms``."""
        if budget != 1 and budget not in self.candidates:
            return
        if not (ms > 0 and math.isfinite(ms)) or batch < 1:
            return
        k = (budget, batch_bucket(batch))
        old = self.ms.get(k)
        if old is not None:
            # one interval moves the average by at most 4x (a pause on the
            # host is not a step time)
            ms = min(4.0 * old, max(0.25 * old, ms))
        self.ms[k] = ms if old is None else old + self.ema * (ms - old)


class OnlineRoundPolicy:
    """``OnlineBudgetPolicy`` behind ``BudgetPolicy``'s interface, for the
    V1 runner's hooks (CPU; CUDA with ``VLLM_USE_V2_MODEL_RUNNER=0``),
    which choose a step's budget after its draft pass, in the worker,
    synchronously: the time between two choices is one step (the verify
    of the tree chosen the time before, and the next draft pass), timed
    when that step was a decode step of the chosen budget
    (``step_budget``, set by the hooks from the scheduler's output; a
    prefill in it, or a batch that decoded plainly, is not a step time).
    The draft pass drafts the full depth (``next_limit``: the largest
    budget), so every arm's time includes it, as it does on this runner."""

    def __init__(self, candidates, clock=time.perf_counter):
        self.online = OnlineBudgetPolicy(candidates)
        self.candidates = self.online.candidates
        self.clock = clock
        # (time, budget, batch) of the last choice
        self._last: tuple[float, int, int] | None = None
        # the budget every request of the step that just ran verified
        # (None: prefill chunks, mixed or cut trees, no step)
        self.step_budget: int | None = None

    @property
    def choices(self) -> dict[int, int]:
        return self.online.choices

    @property
    def calibration(self) -> float:
        return self.online.calibration

    def next_limit(self) -> int:
        return self.candidates[-1]

    def choose(self, cum_logp: torch.Tensor, batch: int,
               limit: int | None = None) -> int:
        now = self.clock()
        if self._last is not None:
            t, b, n = self._last
            if self.step_budget == b and \
                    batch_bucket(n) == batch_bucket(batch):
                self.online.observe_time(b, batch, 1e3 * (now - t))
        self.step_budget = None
        b = self.online.choose(batch)
        if limit is not None:
            b = min(b, limit)
        self._last = (now, b, batch)
        return b

    def observe(self, accepted: float, estimated: float,
                requests: int = 0) -> None:
        """The verified step's accepted drafts over its ``requests``
        trees (the budget: the last choice)."""
        if self._last is not None and requests > 0:
            self.online.observe(self._last[1], [1.0 + accepted / requests])


def _arm_name(arm: int) -> str:
    return "plain" if arm == 1 else str(arm)


def describe_policy(policy, steps: dict[int, int]) -> str:
    """One line on what ``auto`` did: ``steps`` per arm (budget; 1 = a
    plain step) and, for the policy that measures while serving, the
    tokens a request emitted per step at each arm and the best arm with
    its tokens per ms per batch-size bucket measured so far."""
    parts = ["steps " + ", ".join(f"{_arm_name(a)} {n}"
                                  for a, n in sorted(steps.items()))]
    if isinstance(policy, OnlineBudgetPolicy):
        parts.append("tokens/step " + ", ".join(
            f"{_arm_name(a)} {policy.tokens[a]:.2f}"
            for a in policy.arms if a in policy.tokens))
        best = []
        for k in sorted({k for (_, k) in policy.ms}):
            arm, rate = policy.best(k)
            if rate:
                best.append(f"batch {k}+: {_arm_name(arm)} "
                            f"({rate:.3f} tokens/ms)")
        if best:
            parts.append("best " + ", ".join(best))
        parts.append(f"probes {policy.probes}")
    elif hasattr(policy, "calibration"):
        parts.append(f"calibration {policy.calibration:.2f}")
    return "; ".join(parts)


class ChoiceLog:
    """What ``auto`` chose since the last report, at most every
    ``interval`` seconds (the engine logs it as vLLM logs its stats, every
    ``VLLM_LOG_STATS_INTERVAL``): ``poll`` returns the line, or None when
    it is not time yet or no step ran since."""

    def __init__(self, policy, interval: float, clock=time.monotonic):
        self.policy = policy
        self.interval = interval
        self.clock = clock
        self._last = clock()
        self._seen = dict(policy.choices)

    def poll(self) -> str | None:
        now = self.clock()
        if now - self._last < self.interval:
            return None
        cur = dict(self.policy.choices)
        steps = {a: n - self._seen.get(a, 0) for a, n in cur.items()}
        steps = {a: n for a, n in steps.items() if n}
        self._last, self._seen = now, cur
        return describe_policy(self.policy, steps) if steps else None
