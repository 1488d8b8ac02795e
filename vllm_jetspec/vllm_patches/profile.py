"""Where a round's time goes, measured inside the model runner.

Enabled per process by ``JETSPEC_PROFILE=1`` (the bench sets it for its
engines); otherwise every hook is a no-op. Segments of one engine step, as
seen by the runner hooks in ``runner.py`` (any engine: AR, dflash, jetspec):

- ``prepare``: the runner's own ``_prepare_inputs`` (our tree positions and
  masks after it count as ``tree``);
- ``verify``: from the end of ``_prepare_inputs`` to the start of
  ``_sample``: attention metadata, the target's forward and its logits;
- ``accept``: ``_sample``: vLLM's sampler or rejection sampler, or for
  jetspec the per-node target sampling, tree acceptance and KV compaction;
- ``draft``: ``propose_draft_token_ids`` (the head's forward and its
  top-K), without the tree;
- ``tree``: tree construction and bookkeeping (``build_tree``, the packed
  ancestor masks, the drafts' lists).

On CUDA every boundary synchronises the device, so the segments are real
GPU time and the run is a little slower than unprofiled. The step count is
the number of ``_prepare_inputs`` calls (engine steps that ran a forward);
``graph_modes`` counts the CUDA-graph mode (FULL / PIECEWISE / NONE) vLLM
dispatched each target forward to, ``draft_modes`` how each draft pass ran
(``graph``: ``draft_pass.py``; ``vllm``: vLLM's propose). ``stats`` gives,
per segment, the
number of timed spans and their median / 90th-percentile / largest
milliseconds (the first ``MAX_SAMPLES`` spans since the last reset): a
segment whose mean is far above its median holds a few slow steps (e.g. a
one-time cost in the timed window), one with median = mean is uniformly
slow; a span ten times its segment's typical one (and >= 50 ms) is
logged with its step number. ``alloc`` (CUDA only): how often PyTorch's caching allocator
called ``cudaMalloc`` / ``cudaFree`` and had to free its cache and retry
(``num_alloc_retries``) since the last reset -- in steady state all three
stay near 0; retries every step mean the engine runs at the edge of its
memory and pays a device-wide cache flush per step.
Read and reset through the worker RPC ``jetspec_profile`` (``LLM.
collective_rpc("jetspec_profile")``), added to vLLM's ``WorkerBase``.
"""

from __future__ import annotations

import os
import time

import torch

from vllm.logger import init_logger

logger = init_logger("vllm.jetspec.profile")

PROFILE_ENV = "JETSPEC_PROFILE"
SEGMENTS = ("prepare", "verify", "accept", "draft", "tree")
MAX_SAMPLES = 4096      # per segment and reset
# A span this many times its segment's typical one (the median of the
# first 8 since the reset), and at least SLOW_MIN_S, is logged with its
# step, so that it can be matched with other log lines (e.g. vLLM's JIT
# monitor naming a kernel compiled inside a served step).
SLOW_FACTOR, SLOW_MIN_S = 10.0, 0.05
ALLOC_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free")


def _cuda_in_use() -> bool:
    # Not torch.cuda.is_available(): vLLM sets PYTORCH_NVML_BASED_CUDA_CHECK,
    # with which every call on a machine without a GPU tries to load NVML
    # (≈ 130 µs on the 2-core CPU, a dozen calls a profiled step).
    return torch.cuda.is_initialized()


def _alloc_counters() -> dict[str, int]:
    if not _cuda_in_use():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ALLOC_COUNTERS}


class StepProfiler:
    def __init__(self, enabled: bool | None = None):
        self.enabled = (os.environ.get(PROFILE_ENV) == "1"
                        if enabled is None else enabled)
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(SEGMENTS, 0.0)
        self.steps = 0
        # CUDA-graph mode of each target forward (runner._count_graph_modes)
        self.graph_modes: dict[str, int] = {}
        # How each jetspec draft pass ran: "graph" (draft_pass.py, one
        # graph replay or capture) or "vllm" (vLLM's propose)
        self.draft_modes: dict[str, int] = {}
        self.samples: dict[str, list[float]] = {s: [] for s in SEGMENTS}
        self._alloc0 = _alloc_counters()
        self._mark: float | None = None
        self.draft_t0: float | None = None   # start of the draft segment

    def now(self) -> float:
        if _cuda_in_use():
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> float | None:
        """A timestamp (None when disabled)."""
        return self.now() if self.enabled else None

    def add(self, segment: str, since: float | None) -> float | None:
        """Add the time since ``since`` to ``segment``; returns now."""
        if since is None:
            return None
        t = self.now()
        self.seconds[segment] += t - since
        xs = self.samples[segment]
        if len(xs) < MAX_SAMPLES:
            xs.append(t - since)
        if len(xs) > 8:
            typical = sorted(xs[:8])[4]
            if t - since > max(SLOW_MIN_S, SLOW_FACTOR * typical):
                logger.info("jetspec profile: slow %s span, %.1f ms at step "
                            "%d (typical %.2f ms)", segment,
                            1e3 * (t - since), self.steps, 1e3 * typical)
        return t

    def part(self, name: str, since: float | None) -> float | None:
        """A span of a part of a segment (``draft_inputs``, ...): kept
        for ``stats`` only, not added to ``seconds``; returns now."""
        if since is None:
            return None
        t = self.now()
        xs = self.samples.setdefault(name, [])
        if len(xs) < MAX_SAMPLES:
            xs.append(t - since)
        return t

    def sub(self, segment: str, seconds: float) -> None:
        """Take ``seconds`` off ``segment`` (and off its last span)."""
        if self.enabled:
            self.seconds[segment] -= seconds
            if self.samples[segment]:
                self.samples[segment][-1] -= seconds

    def stats(self) -> dict:
        """Per segment with spans: count, median, p90 and max in ms."""
        out = {}
        for seg, xs in self.samples.items():
            if xs:
                ys = sorted(xs)
                out[seg] = dict(
                    n=len(ys), median_ms=round(1e3 * ys[len(ys) // 2], 3),
                    p90_ms=round(1e3 * ys[int(0.9 * (len(ys) - 1))], 3),
                    max_ms=round(1e3 * ys[-1], 3))
        return out

    def mark(self, t: float | None) -> None:
        """Remember the end of ``_prepare_inputs`` (start of ``verify``)."""
        self._mark = t

    def take_mark(self) -> float | None:
        t, self._mark = self._mark, None
        return t

    def snapshot(self, reset: bool = False) -> dict:
        out = dict(enabled=self.enabled, steps=self.steps,
                   seconds=dict(self.seconds),
                   graph_modes=dict(self.graph_modes),
                   draft_modes=dict(self.draft_modes), stats=self.stats())
        now = _alloc_counters()
        if now:
            out["alloc"] = {k: now[k] - self._alloc0.get(k, 0) for k in now}
        if reset:
            self.reset()
        return out


def worker_profile(worker, reset: bool = True) -> dict:
    """``WorkerBase.jetspec_profile``: the model runner's profile."""
    runner = getattr(worker, "model_runner", None)
    prof = getattr(runner, "_jetspec_prof", None)
    if prof is None:
        return dict(enabled=False, steps=0, seconds={})
    out = prof.snapshot(reset=reset)
    policy = getattr(getattr(runner, "drafter", None), "policy", None)
    if policy is None and getattr(runner, "_jetspec_verifier", None):
        # V2 runner: the policy is the scheduler's, in this process when
        # the executor runs its worker in-process (one GPU)
        from .v2.auto import active_policy
        policy = active_policy()
    if policy is not None:
        # tree_budget "auto": steps per chosen budget (1: plain decoding)
        # since the last reset, and the head's calibration factor.
        out["budgets"] = dict(policy.choices)
        out["calibration"] = policy.calibration
        if reset:
            policy.choices.clear()
    return out
