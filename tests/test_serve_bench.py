"""`python -m vllm_jetspec.tools.serve_bench` on CPU: a plain server and a
jetspec server (the soak's tiny served model and its distilled head, budget
4), each measured by vLLM's own `vllm bench serve` client with the same
random requests; every request answered by both, the acceptance length
read from the jetspec server's metrics, the ratios to the plain server
written. (Speed on this CPU means nothing; the tool is for the GPU.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine_io import failure
from test_soak import make_tiny_served_model


@pytest.mark.engine
def test_serve_bench_measures_both_servers_with_vllms_client(tmp_path):
    target, head = make_tiny_served_model(tmp_path / "models")
    out = tmp_path / "sb"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.tools.serve_bench",
         "--model", str(target), "--head", str(head), "--spec", "4",
         "--dtype", "float32", "--max-model-len", "256",
         "--max-num-seqs", "4", "--input-len", "24", "--output-len", "12",
         "--num-prompts", "6", "--concurrency", "2", "--temperature", "0",
         "--servers", "sequential", "--startup-timeout", "600",
         # a server that refuses its config: reported, the others measured
         "--spec-config", "bad/0=" + json.dumps(
             {"method": "jetspec", "model": str(head), "tree_budget": 0}),
         "--out", str(out)],
        capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 1, failure(proc.stdout + proc.stderr, 4000)
    rep = json.loads((out / "serve_bench.json").read_text())
    assert set(rep["servers"]) == {"plain", "jetspec 4", "bad/0"}
    bad = rep["servers"].pop("bad/0")
    assert "tree_budget" in bad["start_error"] and bad["result"] == {}
    assert bad["vs_plain"]["output_throughput"] is None
    assert (out / "server_bad_0.log").exists()
    assert "bad/0 did not start" in proc.stdout
    for label, s in rep["servers"].items():
        r = s["result"]
        assert r["completed"] == 6 and r["failed"] == 0, (label, r)
        # --ignore-eos: every answer is --output-len tokens long
        assert r["total_output_tokens"] == 6 * 12, (label, r)
        assert r["output_throughput"] > 0 and r["mean_tpot_ms"] > 0
        assert s["health"] == 200 and s["start_seconds"] > 0
    spec = rep["servers"]["jetspec 4"]
    assert spec["spec"]["tree_budget"] == 4
    # greedy on a distilled head: some drafts accepted
    assert spec["result"]["spec_decode_acceptance_length"] > 1.0
    assert "spec_decode_acceptance_length" not in \
        rep["servers"]["plain"]["result"]
    q = spec["vs_plain"]
    assert q["output_throughput"] == round(
        spec["result"]["output_throughput"] /
        rep["servers"]["plain"]["result"]["output_throughput"], 3)
    assert rep["meta"]["temperature"] == 0.0
    assert rep["meta"]["servers"] == "sequential"
    # no summary line over a failed server; the table still lists it
    assert "serve_bench: plain" not in proc.stdout
    assert "bad/0" in proc.stdout.split("wrote")[0]


def test_serve_bench_refuses_bad_specs():
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.tools.serve_bench",
         "--spec", "sixteen", "--out", "/tmp/never"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--spec 'sixteen': a tree budget" in proc.stderr


def test_summary_and_ratios():
    from vllm_jetspec.tools.serve_bench import ratios, summary_line

    plain = dict(output_throughput=1000.0, mean_tpot_ms=2.0,
                 median_tpot_ms=2.0, mean_ttft_ms=10.0)
    spec = dict(output_throughput=900.0, mean_tpot_ms=2.5,
                median_tpot_ms=2.4, mean_ttft_ms=12.0,
                spec_decode_acceptance_length=1.8)
    q = ratios(plain, spec)
    assert q == dict(output_throughput=0.9, mean_tpot_ms=1.25,
                     median_tpot_ms=1.2, mean_ttft_ms=1.2)
    assert ratios({}, spec)["output_throughput"] is None
    line = summary_line(dict(servers=dict(
        plain=dict(result=plain),
        **{"jetspec 16": dict(result=spec, vs_plain=q)})))
    assert line == ("serve_bench: plain 1000.0 tok/s (TPOT 2.00 ms); "
                    "jetspec 16 900.0 tok/s = 0.9x plain (TPOT 2.50 ms, "
                    "acceptance length 1.80)")
