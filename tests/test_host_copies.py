"""Host-side helpers of the round: the pinned staging buffer
(``vllm_patches.staging``) and vLLM's spec-decode counters without zero
increments (``vllm_patches.metrics``)."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("vllm")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_staging_copies_many_tensors_at_once(device):
    from vllm_jetspec.vllm_patches.staging import Staging

    # One staging per consumer (as in the runner and the metadata
    # builder): a slot's device views then live two of its copies.
    st, st2 = Staging(torch.device(device)), Staging(torch.device(device))
    g = torch.Generator().manual_seed(0)
    kept = []
    for step in range(6):            # slots are reused, buffers grow
        n = 3 + 400 * step
        xs = [torch.randint(-5, 5, (n,), generator=g),
              torch.randint(0, 9, (2, 3, n), generator=g, dtype=torch.int32),
              torch.zeros(0, dtype=torch.long)]
        out = st.to_device(*xs)
        for x, y in zip(xs, out):
            assert y.device.type == device and y.dtype == torch.int64
            assert y.shape == x.shape and torch.equal(y.cpu(), x.long())
        kept.append((xs, out))
        dst = torch.full((4, 5), -1, dtype=torch.long, device=device)
        src = torch.randint(0, 100, (4, 3), generator=g)
        st2.copy_into(dst[:, :3], src)
        assert torch.equal(dst[:, :3].cpu(), src)
        assert (dst[:, 3:] == -1).all()
    # the previous step's views are still intact (two slots)
    xs, out = kept[-2]
    assert all(torch.equal(x.long(), y.cpu()) for x, y in zip(xs, out))
    if device == "cuda":
        assert st.copies == st2.copies == 6


def test_spec_decode_counters_skip_zero_increments_same_values():
    import prometheus_client as pc
    from vllm.v1.spec_decode.metrics import SpecDecodingProm, SpecDecodingStats

    from vllm_jetspec.vllm_patches import metrics

    def make(observe):
        reg = pc.CollectorRegistry()

        class Prom(SpecDecodingProm):
            _counter_cls = functools.partial(pc.Counter, registry=reg)

        Prom.observe = observe
        spec = type("Spec", (), {"num_speculative_tokens": 9})()
        return Prom(spec, ["model_name", "engine"], {0: ["m", "0"]}), reg

    ours, reg_ours = make(metrics.observe)
    s = SpecDecodingStats.new(9)
    for accepted in ([3, 0, 5], [0], [7, 7, 1]):
        for a in accepted:
            s.observe_draft(num_draft_tokens=7, num_accepted_tokens=a)
    ours.observe(s)
    per = ours.counter_spec_decode_num_accepted_tokens_per_pos[0]
    want = [sum(a > d for a in (3, 0, 5, 0, 7, 7, 1)) for d in range(9)]
    assert [c._value.get() for c in per] == want
    assert ours.counter_spec_decode_num_drafts[0]._value.get() == 7
    assert ours.counter_spec_decode_num_accepted_tokens[0]._value.get() \
        == 23
    # every position is exported, zeros included
    names = [smp.labels["position"] for m in reg_ours.collect()
             for smp in m.samples if smp.name.endswith("per_pos_total")]
    assert names == [str(d) for d in range(9)]
    assert want[-3:] == [2, 0, 0]       # positions past any acceptance
