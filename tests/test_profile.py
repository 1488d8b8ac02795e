"""The round-time profiler's per-span statistics and slow-span log
(``vllm_patches/profile.py``), without an engine."""

from __future__ import annotations

import logging

from vllm_jetspec.vllm_patches import profile as P


class _Clock:
    """A settable ``time.perf_counter`` stand-in."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_span_stats_and_slow_span_log(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(P.time, "perf_counter", clock)
    logged = []

    class Grab(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    grab = Grab()
    P.logger.addHandler(grab)
    try:
        prof = P.StepProfiler(enabled=True)
        spans = [0.002] * 10 + [0.2] + [0.002] * 9
        for i, d in enumerate(spans):
            prof.steps = i
            t = prof.start()
            clock.t += d
            prof.add("draft", t)
            # The tree's share comes off the draft span (as in the runner).
            prof.sub("draft", 0.001)
        snap = prof.snapshot(reset=True)
    finally:
        P.logger.removeHandler(grab)
    st = snap["stats"]["draft"]
    assert st["n"] == 20
    assert abs(st["median_ms"] - 1.0) < 1e-6     # 2 ms - 1 ms taken off
    assert abs(st["max_ms"] - 199.0) < 1e-6
    assert abs(snap["seconds"]["draft"] - (sum(spans) - 20 * 0.001)) < 1e-9
    # Exactly the one outlier is logged, with its step.
    assert len(logged) == 1 and "slow draft span, 200.0 ms at step 10" in \
        logged[0], logged
    # Reset clears the spans; disabled profilers record nothing.
    assert prof.snapshot()["stats"] == {}
    off = P.StepProfiler(enabled=False)
    assert off.start() is None and off.add("draft", None) is None
    assert off.snapshot()["stats"] == {}


def test_parts_are_stats_only():
    """A part of a segment (the draft pass's host inputs, its graph) is
    kept for the per-span stats, not added to the segment seconds; off
    when profiling is off."""
    from vllm_jetspec.vllm_patches.profile import StepProfiler

    p = StepProfiler(enabled=True)
    t = p.start()
    t = p.part("draft_inputs", t)
    p.part("draft_body", t)
    st = p.stats()
    assert st["draft_inputs"]["n"] == 1 and st["draft_body"]["n"] == 1
    assert sum(p.seconds.values()) == 0.0
    assert "draft_inputs" not in p.seconds
    p.reset()
    assert "draft_inputs" not in p.stats()
    off = StepProfiler(enabled=False)
    assert off.part("draft_inputs", off.start()) is None
    assert off.stats() == {}


def test_timestamps_do_not_probe_cuda(monkeypatch):
    """A timestamp asks only whether CUDA is initialised: vLLM sets
    PYTORCH_NVML_BASED_CUDA_CHECK, with which torch.cuda.is_available()
    tries to load NVML on every call where there is no GPU (≈ 130 µs on
    the 2-core CPU, inflating every profiled segment)."""
    import torch

    from vllm_jetspec.vllm_patches.profile import StepProfiler

    def probe():
        raise AssertionError("torch.cuda.is_available() in a timestamp")

    monkeypatch.setattr(torch.cuda, "is_available", probe)
    p = StepProfiler(enabled=True)
    t = p.start()
    p.add("verify", t)
    p.part("draft_inputs", t)
    assert p.snapshot()["steps"] == 0
