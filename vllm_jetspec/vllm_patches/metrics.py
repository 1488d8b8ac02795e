"""vLLM's Prometheus spec-decode counters without the increments by zero.

``SpecDecodingProm.observe`` increments one counter per draft position
every step, ``num_speculative_tokens`` of them: 127 at tree budget 128,
255 at 256, of which only the first ``depth`` (15 for the shipped heads)
can ever be non-zero, since a tree accepts at most its depth. Each
increment takes a lock in ``prometheus_client``; in the trace of
2026-11-25 (budget 128, batch 1, in-process engine) ``observe`` was 11 %
of the device's idle time. Here the same counters get the same values,
only the zero increments are skipped. Every counter still exists from
start-up (vLLM creates them in ``__init__``), so every position is still
exported, at 0 where nothing was accepted.
"""

from __future__ import annotations


def observe(self, spec_decoding_stats, engine_idx: int = 0):
    """``SpecDecodingProm.observe`` with zero increments skipped."""
    if not self.spec_decoding_enabled:
        return
    s = spec_decoding_stats
    self.counter_spec_decode_num_drafts[engine_idx].inc(s.num_drafts)
    self.counter_spec_decode_num_draft_tokens[engine_idx].inc(
        s.num_draft_tokens)
    self.counter_spec_decode_num_accepted_tokens[engine_idx].inc(
        s.num_accepted_tokens)
    per_pos = s.num_accepted_tokens_per_pos
    for pos, counter in enumerate(
            self.counter_spec_decode_num_accepted_tokens_per_pos.get(
                engine_idx, [])):
        if per_pos[pos]:
            counter.inc(per_pos[pos])


def apply() -> None:
    from vllm.v1.spec_decode.metrics import SpecDecodingProm

    if getattr(SpecDecodingProm.observe, "_jetspec", False):
        return
    observe._jetspec = True
    SpecDecodingProm.observe = observe
