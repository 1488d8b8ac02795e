"""``tree_budget: "auto"`` on vLLM's V2 runner, through vLLM's own dynamic
speculative decoding.

vLLM 0.26 lets a speculative config carry
``num_speculative_tokens_per_batch_size``: the scheduler then looks up each
step's draft count from the batch size (``Scheduler.dynamic_sd_lookup``,
read when it sets the next step's draft placeholders), and the V2 runner
captures one FULL verify graph per draft count in that list
(``CudaGraphManager._init_candidates``). A jetspec engine with ``auto``
hands vLLM such a list and replaces the lookup by
``autobudget.ObservedBudgetPolicy``, which picks ``budget - 1`` drafts (0:
a plain step) from the cost model, the batch size, the acceptance the
scheduler saw and its steps' wall times (``update_from_output``, one step
late; no wait for the device); without a cost model by
``autobudget.OnlineBudgetPolicy``, from measured tokens and step times
alone. The draft pass builds the largest tree best first
(``build_tree(layout="best_first")``), so the ``b`` nodes a step verifies
are the tree of budget ``b`` (``TreeVerifier`` verifies each request's
first scheduled nodes).

The list handed to vLLM is the policy's choice at calibration 1 by batch
size (what vLLM's lookup would give if this module's patches were not in
place), plus every other draft count the policy may pick at batch sizes no
engine reaches (``UNREACHED_BATCH`` on): vLLM captures graphs for every
count listed and never looks those ranges up.
"""

from __future__ import annotations

import time
import weakref

from vllm.logger import init_logger

from ...autobudget import (ChoiceLog, CostModel, ObservedBudgetPolicy,
                           OnlineBudgetPolicy, batch_bucket)
from ..config import settings_of

logger = init_logger("vllm.jetspec.v2")

# Batch sizes from here on only carry draft counts for vLLM's graph capture.
UNREACHED_BATCH = 1 << 20
# The largest batch the static part of the schedule covers (vLLM's largest
# default max_num_seqs; larger batches keep the last entry's count).
SCHEDULE_MAX_BATCH = 1024

_active: "weakref.ref[ObservedBudgetPolicy] | None" = None


def active_policy() -> ObservedBudgetPolicy | None:
    """The policy of this process's scheduler (the engine core's), if any:
    the worker's ``jetspec_profile`` reports its choices (in-process
    workers, vLLM's executor for one GPU)."""
    return _active() if _active is not None else None


def make_policy(settings) -> ObservedBudgetPolicy | OnlineBudgetPolicy:
    """The cost model's policy, or without one (``auto_online``) the policy
    that measures while serving."""
    if settings.auto_online:
        return OnlineBudgetPolicy(settings.online_budgets)
    return ObservedBudgetPolicy(CostModel.load(settings.cost_model),
                                settings.budget)


def dynamic_schedule(policy: ObservedBudgetPolicy,
                     max_batch: int = SCHEDULE_MAX_BATCH
                     ) -> list[tuple[int, int, int]]:
    """vLLM's ``num_speculative_tokens_per_batch_size`` for a policy:
    inclusive batch ranges with the policy's draft count at calibration 1,
    then one unreachable range per other count it may pick."""
    ranges: list[tuple[int, int, int]] = []
    for batch in range(1, max_batch + 1):
        k = policy.best(batch)[0] - 1
        if ranges and ranges[-1][2] == k:
            ranges[-1] = (ranges[-1][0], batch, k)
        else:
            ranges.append((batch, batch, k))
    listed = {k for _, _, k in ranges}
    extra = sorted({0, *(b - 1 for b in policy.candidates)} - listed)
    for i, k in enumerate(extra):
        ranges.append((UNREACHED_BATCH + i, UNREACHED_BATCH + i, k))
    return ranges


class PolicyLookup:
    """Stands in for the scheduler's ``dynamic_sd_lookup`` list: item
    ``batch`` is the next step's draft count, the policy's choice."""

    def __init__(self, policy: ObservedBudgetPolicy):
        self.policy = policy

    def __getitem__(self, batch: int) -> int:
        return self.policy.choose(batch) - 1


def decode_budget(scheduler_output) -> int | None:
    """The budget of a step in which every request verified the same
    number of tokens (1: a plain decode step), else None (prefill chunks,
    a request cut near ``max_model_len``, an empty step)."""
    counts = set(scheduler_output.num_scheduled_tokens.values())
    if len(counts) != 1:
        return None
    n = counts.pop()
    spec = scheduler_output.scheduled_spec_decode_tokens
    drafts = {len(d) for d in spec.values()} if spec else {0}
    return n if drafts == {n - 1} else None


class StepClock:
    """Wall time between a scheduler's step outputs: under async
    scheduling that is the device's time per step, measured on the host
    without waiting for anything. A step is timed when it and the step
    before it were decode steps of the same budget and about the same
    batch (the same power-of-two bucket: under serving traffic the batch
    moves by a request or two between steps; otherwise the interval
    holds a prefill or the change)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.last: tuple[float, int | None, int] | None = None

    def tick(self, policy: ObservedBudgetPolicy, scheduler_output) -> None:
        now = self.clock()
        budget = decode_budget(scheduler_output)
        batch = len(scheduler_output.num_scheduled_tokens)
        last, self.last = self.last, (now, budget, batch)
        if last is not None and budget is not None and last[1] == budget \
                and batch_bucket(last[2]) == batch_bucket(batch):
            policy.observe_time(budget, batch, 1e3 * (now - last[0]))


def observe_step(policy: ObservedBudgetPolicy, scheduler_output,
                 model_runner_output) -> None:
    """Feed the policy one verified step: per request with drafts, the
    tokens it emitted, grouped by the budget it was verified at (the
    step's choice; a request cut near ``max_model_len`` has fewer)."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    sampled = model_runner_output.sampled_token_ids
    if not spec or sampled is None or len(sampled) == 0:
        return
    index = model_runner_output.req_id_to_index
    by_budget: dict[int, list[int]] = {}
    for req_id, drafts in spec.items():
        i = index.get(req_id)
        if i is None or not drafts:
            continue
        n = len(sampled[i])
        if n:
            by_budget.setdefault(len(drafts) + 1, []).append(n)
    if by_budget:
        budget = max(by_budget, key=lambda b: len(by_budget[b]))
        policy.observe(budget, by_budget[budget])


def _auto_v2(vllm_config) -> bool:
    s = settings_of(getattr(vllm_config, "speculative_config", None))
    return s is not None and s.auto and \
        bool(getattr(vllm_config, "use_v2_model_runner", False))


def wrap_scheduler_init(orig):
    """``Scheduler.__init__``: for a jetspec ``auto`` engine on the V2
    runner, the batch-size lookup vLLM built from the schedule is replaced
    by the policy."""
    def __init__(self, vllm_config, *args, **kwargs):
        orig(self, vllm_config, *args, **kwargs)
        self._jetspec_policy = None
        if not _auto_v2(vllm_config):
            return
        global _active
        s = settings_of(vllm_config.speculative_config)
        if not vllm_config.scheduler_config.async_scheduling:
            # vLLM turned it off (an executor without it, e.g. Ray): the
            # synchronous scheduler takes each draft pass's drafts, all of
            # them, and never asks the lookup for a count
            logger.warning("jetspec: tree_budget 'auto' without async "
                           "scheduling (vLLM turned it off for this "
                           "engine): every step drafts %d slots, as a static "
                           "tree_budget %d", s.budget - 1, s.budget)
            return
        if getattr(self, "dynamic_sd_lookup", None) is None:
            logger.warning("jetspec: tree_budget 'auto': vLLM's scheduler "
                           "built no dynamic-SD lookup; every step drafts "
                           "%d slots", s.budget - 1)
            return
        policy = make_policy(s)
        self.dynamic_sd_lookup = PolicyLookup(policy)
        self._jetspec_policy = policy
        self._jetspec_clock = StepClock()
        # What it chose, in the log as vLLM logs its stats (vllm serve;
        # not for LLM(), which turns stats off).
        from vllm import envs
        self._jetspec_log = ChoiceLog(policy, envs.VLLM_LOG_STATS_INTERVAL) \
            if getattr(self, "log_stats", False) else None
        _active = weakref.ref(policy)
        logger.info("jetspec: tree_budget 'auto' on the V2 runner: budgets "
                    "%s or plain steps, chosen per step from the batch size "
                    "and the acceptance seen (%s)", policy.candidates,
                    f"cost model {s.cost_model}" if s.cost_model else
                    "no cost model: step times and tokens measured while "
                    "serving")
    __init__._jetspec_wrapped = True
    return __init__


def wrap_update_from_output(orig):
    """``Scheduler.update_from_output``: the policy sees each step's
    accepted tokens before vLLM's bookkeeping."""
    def update_from_output(self, scheduler_output, model_runner_output):
        policy = getattr(self, "_jetspec_policy", None)
        if policy is not None:
            observe_step(policy, scheduler_output, model_runner_output)
            self._jetspec_clock.tick(policy, scheduler_output)
            log = getattr(self, "_jetspec_log", None)
            if log is not None and (line := log.poll()):
                logger.info("jetspec auto: %s", line)
        return orig(self, scheduler_output, model_runner_output)
    update_from_output._jetspec_wrapped = True
    return update_from_output


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    if getattr(Scheduler.__init__, "_jetspec_wrapped", False):
        return
    Scheduler.__init__ = wrap_scheduler_init(Scheduler.__init__)
    Scheduler.update_from_output = wrap_update_from_output(
        Scheduler.update_from_output)
