"""The command-line tools on the default model (SmolLM2-135M-Instruct,
built from PyPI by vllm_jetspec.tools.assets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from engine_io import failure

from vllm_jetspec.tools import assets

# Long, unrelated tools: each test runs wherever an xdist worker is free
# (root conftest.py).
pytestmark = pytest.mark.independent


@pytest.fixture(scope="module")
def smollm2():
    return assets.default_model_dir()


@pytest.fixture(scope="module")
def random_smollm2_head(smollm2, tmp_path_factory):
    from vllm_jetspec.head import HeadConfig, random_head, save_head

    hc = HeadConfig.for_target(smollm2, num_layers=1,
                               target_layer_ids=[1, 15, 27], block_size=8)
    d = tmp_path_factory.mktemp("head")
    save_head(random_head(hc, seed=0), hc, d)
    return d


def test_eval_tau_cli(random_smollm2_head, tmp_path):
    out = tmp_path / "tau.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.tools.eval_tau", "--prompts", "gsm8k",
         "--num-prompts", "2", "--max-new-tokens", "6", "--budgets", "1", "8",
         "--algos", "chain", "accum_logp", "--head", str(random_smollm2_head),
         "--device", "cpu", "--json", str(out), "--quiet"],
        capture_output=True, text=True)
    assert proc.returncode == 0, failure(proc.stderr, 3000)
    res = json.loads(out.read_text())
    assert set(res["tau"]) == {"chain", "accum_logp"}
    for algo in ("chain", "accum_logp"):
        assert res["tau"][algo]["1"] == 1.0   # root only: one token a round
        assert res["tau"][algo]["8"] >= 1.0
        assert res["detail"][algo]["8"]["prompts"] == 2
    assert "tau (tokens per verify forward" in proc.stdout


def test_help_of_every_tool():
    for mod in ("tools.eval_tau", "tools.train", "tools.demo", "tools.assets",
                "tools.sweep", "tools.bench", "tools.cpu_gemm", "tools.soak",
                "tree.bench", "kernels.bench_tree_attention"):
        proc = subprocess.run([sys.executable, "-m", f"vllm_jetspec.{mod}",
                               "--help"], capture_output=True, text=True)
        assert proc.returncode == 0, (mod, failure(proc.stderr, 2000))
        assert "usage" in proc.stdout


GEN_SCRIPT = """
import json, sys
if __name__ == "__main__":
    from vllm_jetspec.tools.train import generate_data
    n = generate_data(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3],
                      max_new_tokens=12, max_model_len=512, dtype="float32",
                      gpu_memory_utilization=0.3, enforce_eager=True,
                      chunk=1)
    print("N", n)
"""


@pytest.mark.engine
def test_training_data_is_the_targets_own_greedy_output(smollm2, tmp_path):
    """`train data` generates with vLLM; in fp32 that is the target's own
    greedy continuation (checked against transformers)."""
    from transformers import AutoModelForCausalLM

    from vllm_jetspec.reference import target_greedy

    prompts = ["What is 7 times 8?", "Name a fruit."]
    script = tmp_path / "gen.py"
    script.write_text(GEN_SCRIPT)
    out = tmp_path / "data.jsonl"
    proc = subprocess.run([sys.executable, str(script), str(smollm2),
                           json.dumps(prompts), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, failure(proc.stderr, 4000)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2
    target = AutoModelForCausalLM.from_pretrained(
        smollm2, dtype=torch.float32).eval()
    for r in rows:
        ref = target_greedy(target, r["prompt_ids"], 12)
        assert r["response_ids"] == ref[:len(r["response_ids"])]


@pytest.mark.engine
def test_demo_runs_jetspec_through_vllm(smollm2):
    """`scripts/demo.sh`'s program: the shipped head through vLLM on the
    default model (fp32), on GSM8K prompts: output identical to no-spec, and
    tau from vLLM's spec-decode metrics above 1.5. Run as a user runs it:
    with vLLM's torch.compile'd sampler helper, which the other CPU tests
    leave eager (TORCH_COMPILE_DISABLE, root conftest.py)."""
    env = {k: v for k, v in os.environ.items()
           if k != "TORCH_COMPILE_DISABLE"}
    proc = subprocess.run([sys.executable, "-m", "vllm_jetspec.tools.demo",
                           "--num-prompts", "2", "--max-new-tokens", "64"],
                          capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, failure(proc.stdout + proc.stderr, 4000)
    assert proc.stdout.count("identical to no-spec: True") == 2
    line = [x for x in proc.stdout.splitlines()
            if x.startswith("overall: tau")][-1]
    assert float(line.split()[2]) > 1.5, line


@pytest.mark.engine
def test_sweep_through_vllm(smollm2, tmp_path):
    """`python -m vllm_jetspec.tools.sweep`: AR, the linear (chain) baseline and
    jetspec at budget 8 (the head drafts 7 of its 15 slots: a tree of 8
    nodes is at most 7 deep), at batch 1 and 2, on two datasets through the
    same engines: every output equals AR's, τ does not depend on the batch
    size (each request's rounds are its own), files are written (a pair of
    plots per dataset)."""
    import csv

    out = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.tools.sweep", "--num-prompts", "2",
         "--max-new-tokens", "16", "--budgets", "8", "--batch-sizes", "1",
         "2", "--dataset", "gsm8k", "humaneval", "--out", str(out)],
        capture_output=True, text=True,
        timeout=1200)
    assert proc.returncode == 0, failure(proc.stdout + proc.stderr, 4000)
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    got = {(r["dataset"], r["method"], int(r["budget"]), int(r["batch"])): r
           for r in rows}
    sets = ("gsm8k", "humaneval")
    assert len(got) == len(rows) == 12
    assert set(got) == {(d, m, b, B) for m, b in [("ar", 0), ("chain", 16),
                                                   ("jetspec", 8)]
                        for B in (1, 2) for d in sets}
    assert all(r["identical_to_ar"] == "True" for r in rows)
    for d in sets:
        for m, b in [("chain", 16), ("jetspec", 8)]:
            assert got[(d, m, b, 1)]["tau"] == got[(d, m, b, 2)]["tau"]
            assert got[(d, m, b, 1)]["rounds"] == got[(d, m, b, 2)]["rounds"]
            assert float(got[(d, m, b, 1)]["tau"]) > 1.0
    # The CUDA-graph mode of every target forward is counted (on CPU:
    # none, eager).
    for r in json.loads((out / "sweep.json").read_text())["rows"]:
        assert set(r["graph_modes"]) == {"NONE"}, r
        assert r["graph_modes"]["NONE"] > 0, r
    meta = json.loads((out / "sweep.json").read_text())["meta"]
    assert meta["num_prompts"] == {"gsm8k": 2, "humaneval": 2}
    assert meta["baseline"] == "chain"
    assert meta["graphs"] is False and meta["device"].startswith("CPU")
    # Rows are saved after every engine (a run cut short keeps them).
    partial = json.loads((out / "partial.json").read_text())["rows"]
    assert len(partial) == len(rows)
    for png in ("tau_vs_budget", "speedup_vs_budget"):
        for d in sets:
            assert (out / f"{png}_{d}.png").read_bytes()[:4] == b"\x89PNG"
    # The AR result is kept for --ar-from; a run with other settings refuses
    # it before any engine starts.
    assert json.loads((out / "ar.json").read_text())["result"]["sets"]
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.tools.sweep", "--num-prompts", "2",
         "--max-new-tokens", "8", "--budgets", "8", "--batch-sizes", "1",
         "2", "--dataset", "gsm8k", "humaneval", "--baseline", "none",
         "--ar-from", str(out / "ar.json"), "--out", str(tmp_path / "s2")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "recorded with other prompts or settings" in proc.stderr


def test_kernel_bench_plot_from_json(tmp_path):
    """The kernel bench redraws its PNG from an earlier JSON (no timing):
    the default variant's rows, time and % of copy bandwidth."""
    rows = [dict(batch=b, prefix=p, budget=n, tiles=t, splits=s,
                 us=10.0 * n / b, us_eager=50.0, timing="graph",
                 gbps=1.0, frac_of_copy=0.1 * b, max_diff_vs_first=0.0)
            for b in (1, 8) for p in (512,) for n in (16, 128)
            for t, s in (("large", 1), ("small", "auto"))]
    src = tmp_path / "k.json"
    src.write_text(json.dumps(dict(device="test", dtype="bf16", rows=rows)))
    png = tmp_path / "k.png"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.kernels.bench_tree_attention",
         "--plot-from", str(src), "--png", str(png)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, failure(proc.stderr, 2000)
    assert png.read_bytes()[:4] == b"\x89PNG"
    # --plot-from without --png is one clear error.
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.kernels.bench_tree_attention",
         "--plot-from", str(src)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--plot-from needs --png" in proc.stderr


def test_kernel_bench_roofline():
    """The roofline fields: a shape whose bytes take longer than its dot
    products is memory-bound, the other way round compute-bound; the
    fraction of the roofline is the larger floor over the time."""
    from vllm_jetspec.kernels.bench_tree_attention import (
        add_roofline, attention_flops, matmul_tflops)

    assert attention_flops(2, 16, 100, 4, 8) == 4 * 2 * 16 * 4 * 8 * 116
    rows = [dict(us=100.0, gbps=1500.0, tflops=100.0),    # memory
            dict(us=100.0, gbps=300.0, tflops=400.0)]     # compute
    add_roofline(rows, copy_gbps=3000.0, matmul_tflops=800.0)
    assert rows[0]["bound"] == "memory" and rows[1]["bound"] == "compute"
    assert rows[0]["frac_of_roofline"] == 0.5 == rows[0]["frac_of_copy"]
    assert rows[1]["frac_of_roofline"] == 0.5 == rows[1]["frac_of_matmul"]
    rows = [dict(us=1.0, gbps=1.0, tflops=1.0)]
    add_roofline(rows, copy_gbps=2.0, matmul_tflops=None)
    assert rows[0]["frac_of_copy"] == 0.5 and "bound" not in rows[0]
    assert matmul_tflops(n=64, repeats=2, dtype=torch.float32,
                         device="cpu") > 0


def test_first_differences_name_prompt_and_position():
    """A bench row whose outputs differ from AR's says where (per prompt,
    the first differing token), so the near-tie can be looked up."""
    from vllm_jetspec.tools.engine_job import first_differences, result_rows

    base = [[1, 2, 3], [4, 5, 6], [7, 8]]
    ids = [[1, 2, 3], [4, 9, 6], [7, 8, 1]]
    assert first_differences(ids, base) == {1: 1, 2: 2}
    assert first_differences(base, base) == {}
    res = {"batches": {"1": dict(ids=ids, tokens=9, seconds=1.0, drafts=0,
                                 accepted=0)}}
    ar = {"batches": {"1": dict(ids=base, tokens=8, seconds=1.0, drafts=0,
                                accepted=0)}}
    row, = result_rows("jetspec", 16, res, ar)
    assert row["identical_to_ar"] is False
    assert row["differs_at"] == {1: 1, 2: 2}
    row, = result_rows("ar", 0, ar, ar)
    assert row["identical_to_ar"] is True and "differs_at" not in row


def test_soak_names_the_cause_of_each_difference():
    """The soak's probes at a difference (vllm_jetspec.tools.soak.diff_cause):
    each server's pick after the same prefix says whether the backends
    order a near-tie differently (flip), vLLM did not reproduce itself
    (reference) or jetspec's round disagrees with its own plain step
    (spec); the tie bound is how far the backends move one token against
    the other, over the temperature. Rows from the H200 soak of
    2026-12-03 (requests 90, 592, 755)."""
    from vllm_jetspec.tools.soak import diff_cause

    def probe(top, sampled=None):
        d = dict(top=top, gap=round(top[0][1] - top[1][1], 6))
        if sampled is not None:
            d["sampled"] = sampled
        return d

    flip = dict(tokens_there=[5127, 14172], params={"temperature": 0.0},
                logprobs_at_diff=dict(
                    spec=probe([[14172, -1.53103], [5127, -1.546447]]),
                    ref=probe([[5127, -1.536876], [14172, -1.538942]])))
    c = diff_cause(flip)
    assert c["cause"] == "flip"
    assert c["tie_bound"] == pytest.approx(0.017483, abs=1e-6)
    assert c["probe_deviation"] == pytest.approx(0.009571, abs=1e-6)
    ref = dict(tokens_there=[30, 28], params={"temperature": 0.0},
               logprobs_at_diff=dict(
                   spec=probe([[28, -1.651124], [30, -1.652583]]),
                   ref=probe([[28, -1.653253], [30, -1.653404]])))
    assert diff_cause(ref)["cause"] == "reference"
    ends = dict(tokens_there=[None, 198], logprobs_at_diff=dict(
        spec=probe([[198, -0.23], [29, -3.3]]),
        ref=probe([[198, -0.23], [29, -3.3]])))
    assert diff_cause(ends)["cause"] == "ends"
    # Seeded: the picks are the probes' draws, not their top tokens; the
    # bound is over the temperature.
    seeded = dict(tokens_there=[7, 9], params={"temperature": 0.5},
                  logprobs_at_diff=dict(
                      spec=probe([[3, -1.0], [9, -2.0], [7, -2.01]], 9),
                      ref=probe([[3, -1.0], [7, -2.0], [9, -2.004]], 7)))
    c = diff_cause(seeded)
    assert c["cause"] == "flip"
    assert c["tie_bound"] == pytest.approx((0.01 + 0.004) / 0.5, abs=1e-6)
    seeded["logprobs_at_diff"]["spec"]["sampled"] = 3
    assert diff_cause(seeded)["cause"] == "spec"
    assert diff_cause(dict(tokens_there=[1, 2]))["cause"] == "unprobed"
    # Output-dependent parameters: a one-token probe's pick says nothing.
    assert diff_cause(dict(flip, unsupported="structured_regex"))[
        "cause"] == "unprobed"
    assert diff_cause(dict(flip, unsupported="logit_bias"))["cause"] == "flip"


def test_soak_pass_summary_keeps_the_failures():
    """A pass's summary (written to partial.json after every pass) holds
    the failed requests' errors, when each was sent and how long it took,
    earliest first, and the verdict names the first: the H200 soak of
    2026-12-04 was cut before its report and left only
    ``failed_by_cause: {"connection": 11}``."""
    from vllm_jetspec.tools.soak import (FAILURE_EXAMPLES, Req,
                                         check_verdict, pass_summary)

    plan = [Req(idx=i, api="chat", stream=bool(i % 2), mode="greedy",
                prompt="x", prompt_len=1, length_class="short")
            for i in range(20)]
    res = [dict(status="ok", token_ids=[1, 2], sent_at_s=0.1 * i)
           for i in range(20)]
    for i in (3, 7):
        res[i] = dict(status="failed", cause="connection",
                      error=f"RemoteProtocolError('{i}')",
                      sent_at_s=10.0 - i, seconds=0.5)
    s = pass_summary(plan, dict(results=res, wall_s=2.0))
    assert s["failed"] == 2 and s["failed_by_cause"] == {"connection": 2}
    assert [f["idx"] for f in s["failures"]] == [7, 3]
    assert s["failures"][0] == dict(idx=7, cause="connection",
                                    error="RemoteProtocolError('7')",
                                    api="chat", stream=True, bad=None,
                                    sent_at_s=3.0, seconds=0.5)
    s.update(health=200, alive=True, after={}, cut_by_time_limit=0)
    reasons = check_verdict(dict(passes={"spec": s}, compare={},
                                 bad_input_status_mismatch=[]), None)
    assert reasons == ["spec: 2 failed {'connection': 2} "
                       "(first: RemoteProtocolError('7'))"]
    many = [dict(status="failed", cause="timeout", sent_at_s=i)
            for i in range(20)]
    assert len(pass_summary(plan, dict(results=many, wall_s=1.0))[
        "failures"]) == FAILURE_EXAMPLES
