"""Training smoke tests on CPU with a tiny random target."""

from __future__ import annotations

import json

import pytest
import torch

from models import make_tiny_qwen3
from vllm_jetspec.head import load_head
from vllm_jetspec.reference import (ReferenceDecoder, TreeConfig,
                                    target_greedy)
from vllm_jetspec.tools.train import FitConfig, fit, load_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("train")
    tdir = make_tiny_qwen3(d / "tiny", vocab=64, layers=4)
    target = transformers.AutoModelForCausalLM.from_pretrained(tdir).eval()
    g = torch.Generator().manual_seed(0)
    prompts = []
    with open(d / "data.jsonl", "w") as f:
        for _ in range(16):
            p = torch.randint(0, 64, (5,), generator=g).tolist()
            prompts.append(p)
            f.write(json.dumps(dict(
                prompt_ids=p, response_ids=target_greedy(target, p, 40)))
                + "\n")
    return d, tdir, target, prompts


def small(**kw):
    base = dict(layers=1, target_layer_ids=(0, 2), block_size=8, steps=60,
                batch_size=4, anchors_per_seq=8, max_len=64, lr=3e-3,
                warmup=5, log_every=10, save_every=30)
    base.update(kw)
    return FitConfig(**base)


def history(path):
    return [json.loads(x) for x in open(path / "history.jsonl")]


def test_fit_learns_and_the_head_drafts(setup):
    d, tdir, target, prompts = setup
    out = d / "run"
    s = fit(str(tdir), str(d / "data.jsonl"), str(out), small(),
            device="cpu", progress=False)
    h = history(out)
    assert s["steps"] == 60 and len(h) == 6
    assert h[-1]["loss"] < h[0]["loss"]
    assert h[-1]["agree"][0] > h[0]["agree"][0] + 0.2
    # The checkpoint is a loadable head whose drafts the target accepts
    # on its own training prompts.
    head = load_head(out)
    dec = ReferenceDecoder(target, head, TreeConfig(budget=16, width=4))
    r = dec.generate(prompts[0], 30)
    assert r.token_ids == target_greedy(target, prompts[0], 30)
    assert r.tau > 1.5, r.tau


def test_resume_reproduces_an_uninterrupted_run(setup):
    d, tdir, _, _ = setup
    fit(str(tdir), str(d / "data.jsonl"), str(d / "straight"),
        small(steps=20, save_every=10), device="cpu", progress=False)
    cfg = small(steps=20, save_every=7)
    s = fit(str(tdir), str(d / "data.jsonl"), str(d / "resumed"), cfg,
            device="cpu", progress=False, stop_at=10)
    assert s["steps"] == 10 and not s["done"]
    s = fit(str(tdir), str(d / "data.jsonl"), str(d / "resumed"), cfg,
            device="cpu", resume=True, progress=False)
    assert s["steps"] == 20 and s["done"]
    a = load_head(d / "straight").state_dict()
    b = load_head(d / "resumed").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_load_data_skips_short_and_truncates(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        dict(prompt_ids=[1, 2], response_ids=[3]),
        dict(prompt_ids=[1, 2], response_ids=list(range(100)))]))
    rows = load_data(str(p), max_len=10)
    assert len(rows) == 1 and len(rows[0][0]) == 10 and rows[0][1] == 2


def test_init_warm_starts_from_a_head(setup):
    d, tdir, _, _ = setup
    data = str(d / "data.jsonl")
    fit(str(tdir), data, str(d / "first"), small(steps=30), device="cpu",
        progress=False)
    trained = history(d / "first")[-1]["loss"]
    # Two data files are read as one set.
    s = fit(str(tdir), [data, data], str(d / "warm"),
            small(steps=2, log_every=1), device="cpu", progress=False,
            init_from=str(d / "first"))
    cold = fit(str(tdir), data, str(d / "cold"), small(steps=2, log_every=1),
               device="cpu", progress=False)
    assert s["init_from"] == str(d / "first")
    assert s["sequences"] == 2 * cold["sequences"]
    # The first step's loss (before any update) is the trained head's.
    warm0 = history(d / "warm")[0]["loss"]
    cold0 = history(d / "cold")[0]["loss"]
    assert warm0 < 0.3 * cold0 and warm0 < 3 * trained, (warm0, trained,
                                                           cold0)
    with pytest.raises(ValueError, match="architecture differs"):
        fit(str(tdir), data, str(d / "bad"), small(steps=2, layers=2),
            device="cpu", progress=False, init_from=str(d / "first"))
