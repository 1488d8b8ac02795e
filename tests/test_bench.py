"""`python -m vllm_jetspec.tools.bench` on a tiny random model (CPU, fp32), replay
mode: every engine's tokens equal AR's, τ is exactly min(budget, depth + 1)
(every replayed draft accepted), the round-time split is measured, and
tree_budget "auto" runs on the cost model the same run wrote."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from engine_io import failure
from models import make_tiny_target_and_head


# A variant that changes how the V1 hooks run on CPU (their stand-in CUDA
# graphs: every call through static buffers), not the tokens.
VARIANT_KEY = "JETSPEC_TREE_GRAPHS"
VARIANT = f"ctx:{VARIANT_KEY}=host"


@pytest.mark.engine
def test_bench_replay_on_a_tiny_model(tmp_path):
    target, head = make_tiny_target_and_head(tmp_path)     # depth 7
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.tools.bench", "--target", str(target),
         "--head", str(head), "--prompt-len", "20",
         "--max-new-tokens", "24", "--budgets", "4", "--batch-sizes", "1",
         "2", "--num-prompts", "2", "--replay", "--baseline", "none",
         "--auto", "--auto-online", "--variant", VARIANT,
         "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, failure(proc.stdout + proc.stderr, 4000)
    assert len(list(csv.DictReader(open(out / "bench.csv")))) == 10
    res = json.loads((out / "bench.json").read_text())
    got = {(r["method"], r["budget"], r["batch"]): r for r in res["rows"]}
    assert set(got) == {(m, b, B) for m, b in [
        ("ar", 0), ("jetspec", 4), ("auto", 4), ("auto_online", 4),
        ("jetspec~ctx", 4)] for B in (1, 2)}
    # The variant's engine ran with its variable: its engine core took
    # the stand-in graphs (its log says so), the default engine did not.
    logs = {part.partition("\n")[0]: part for part in
            (out / "engine_logs.txt").read_text().split("===== ")[1:]}
    host = "acceptance + compaction replays a graph per shape (host)"
    assert host in logs[f"jetspec~ctx 4 {VARIANT_KEY}=host"]
    assert host not in logs["jetspec 4"]
    assert res["meta"]["variants"] == {"ctx": {VARIANT_KEY: "host"}}
    for B in (1, 2):
        auto = got.pop(("auto", 4, B))
        assert auto["identical_to_ar"] is True
        # Its choices: budget 4 (the only one measured) or plain decoding.
        assert set(auto["auto_budgets"]) <= {"1", "4"}
        assert sum(auto["auto_budgets"].values()) > 0
        assert auto["auto_calibration"] > 0
        # Without the cost model: budget 4 (tree_budget_max) or plain
        # steps, measured while running.
        online = got.pop(("auto_online", 4, B))
        assert online["identical_to_ar"] is True
        assert set(online["auto_budgets"]) <= {"1", "4"}
        assert sum(online["auto_budgets"].values()) > 0
    assert "auto_online, batch 1: steps per budget" in proc.stdout
    segs = ["prepare", "verify", "accept", "draft", "tree"]
    for (m, b, B), r in got.items():
        assert r["identical_to_ar"] is True
        # A random head accepts next to nothing; replay makes every draft
        # the target's own token: tau = tokens per round = min(b, 8).
        assert r["tau"] == (1.0 if m == "ar" else min(b, 8)), r
        assert r["steps"] > 0 and r["verify_ms"] > 0
        assert sum(r[f"{s}_ms"] for s in segs) <= r["round_ms"]
        assert (r["draft_ms"] > 0) == (m != "ar")
        # Every target forward's CUDA-graph mode (CPU: none, eager).
        assert set(r["graph_modes"]) == {"NONE"} and \
            r["graph_modes"]["NONE"] >= r["steps"], r
        # Per-span statistics: one verify span per step; the median and
        # max bracket the mean.
        st = r["segment_stats"]
        assert st["verify"]["n"] == r["steps"], r
        assert st["verify"]["median_ms"] <= st["verify"]["p90_ms"] <= \
            st["verify"]["max_ms"]
        assert st["verify"]["max_ms"] >= r["verify_ms"] - 1e-3
        assert ("draft" in st) == (m != "ar")
    meta = res["meta"]
    assert meta["replay"] and meta["depth"] == 7
    cost = json.loads((out / "cost_model.json").read_text())
    assert set(cost["round_ms"]) == {"4"} and set(cost["ar_ms"]) == {"1", "2"}
    assert json.loads((out / "replay.json").read_text())["sequences"]
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    # The AR result is kept for --ar-from; another run's settings refuse it
    # (before any engine starts).
    saved = json.loads((out / "ar.json").read_text())
    replayed = json.loads((out / "replay.json").read_text())["sequences"]
    assert saved["result"]["batches"]["1"]["ids"] == \
        [s["output"] for s in replayed]
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.tools.bench", "--target", str(target),
         "--head", str(head), "--prompt-len", "20",
         "--max-new-tokens", "16", "--budgets", "4", "--batch-sizes", "1",
         "2", "--num-prompts", "2", "--replay", "--baseline", "none",
         "--ar-from", str(out / "ar.json"), "--out", str(tmp_path / "b2")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "recorded with other prompts or settings" in proc.stderr
    # --resume: the same command again starts no engine (every engine's
    # rows are in partial.json) and writes the same rows; another run's
    # settings refuse the folder.
    cmd = [sys.executable, "-m", "vllm_jetspec.tools.bench", "--target",
           str(target), "--head", str(head), "--prompt-len", "20",
           "--max-new-tokens", "24", "--budgets", "4", "--batch-sizes", "1",
           "2", "--num-prompts", "2", "--replay", "--baseline", "none",
           "--auto", "--auto-online", "--variant", VARIANT, "--out",
           str(out), "--resume"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc.stdout + proc.stderr, 4000)
    again = json.loads((out / "bench.json").read_text())
    assert again["rows"] == json.loads(json.dumps(res["rows"]))
    assert again["meta"]["engine_start_seconds"] == \
        res["meta"]["engine_start_seconds"]
    assert "Initializing a V1 LLM engine" not in proc.stdout + proc.stderr
    # ar, jetspec4, auto, auto_online, jetspec~ctx 4
    assert proc.stdout.count("resumed from") == 5
    cmd[cmd.index("24")] = "16"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "written with other prompts or settings" in proc.stderr


def test_ar_result_round_trip(tmp_path):
    from vllm_jetspec.tools.bench import load_ar, save_ar

    job = dict(prompts=[[1, 2, 3]], max_new_tokens=4, batch_sizes=[1],
               engine=dict(enforce_eager=True))
    res = dict(start_seconds=1.0, batches={"1": dict(ids=[[5, 6]])})
    save_ar(str(tmp_path / "ar.json"), res, job)
    assert load_ar(str(tmp_path / "ar.json"), dict(job)) == res
    with pytest.raises(SystemExit, match="other prompts or settings"):
        load_ar(str(tmp_path / "ar.json"), dict(job, max_new_tokens=5))


def test_graph_sizes_give_every_batch_a_whole_tree_graph():
    """bench/sweep engines with --graphs capture budget x vLLM's batch
    buckets: every batch size up to max_num_seqs pads to a captured size
    that is a whole number of trees, the largest being max_num_seqs trees
    (vLLM's own default stops at 512 tokens)."""
    from vllm_jetspec.tools.engine_job import graph_sizes

    for budget in (4, 16, 128, 256):
        for seqs in (1, 3, 8, 32, 300):
            sizes = graph_sizes(budget, seqs)
            assert sizes == sorted(set(sizes))
            assert all(s % budget == 0 for s in sizes)
            assert sizes[-1] == budget * seqs
            for b in range(1, seqs + 1):
                pad = min(s for s in sizes if s >= b * budget) - b * budget
                # vLLM's buckets: powers of two to 8, then steps of 8 / 16.
                assert pad <= min(b - 1, 15) * budget, (budget, seqs, b)
    assert graph_sizes(16, 8) == [16, 32, 64, 128]


def test_variants_are_parsed_or_refused():
    from vllm_jetspec.tools.bench import parse_variants

    assert parse_variants([]) == {}
    assert parse_variants(["torchrows:JETSPEC_VERIFY_ROWS=torch",
                           "two:A=1,B=x=y"]) == {
        "torchrows": {"JETSPEC_VERIFY_ROWS": "torch"},
        "two": {"A": "1", "B": "x=y"}}
    for bad in ["noenv", "x:", ":A=1", "x:1A=2", "a-b:A=1"]:
        with pytest.raises(ValueError, match="LABEL:KEY=VALUE"):
            parse_variants([bad])
    with pytest.raises(ValueError, match="LABEL"):
        parse_variants(["x:A=1", "x:B=2"])


def test_a_round_the_runner_did_not_split_prints_dashes_not_zeros(tmp_path):
    """vLLM's V2 runner (and stock engines) give the round's wall time
    only: the bench's table says so instead of printing 0.00 ms for
    prepare, verify, accept, draft and tree (as the H100 run of 2026-12-05
    printed), and the V1 runner's split rows keep their numbers."""
    from vllm_jetspec.tools.bench import SEGMENTS, format_table, plot, rows_of

    ids = [[1, 2, 3], [4, 5, 6]]
    ar = {"batches": {"1": dict(tokens=6, seconds=0.06, ids=ids, drafts=0,
                                accepted=0)}}
    v2 = {"batches": {"1": dict(tokens=6, seconds=0.03, ids=ids, drafts=2,
                                accepted=2)}}
    v1 = {"batches": {"1": dict(
        tokens=6, seconds=0.03, ids=ids, drafts=2, accepted=2,
        profile=dict(steps=3, seconds=dict(prepare=0.003, verify=0.012,
                                           accept=0.003, draft=0.006,
                                           tree=0.003)))}}
    (untimed,) = rows_of("jetspec", 4, False, v2, ar)
    (timed,) = rows_of("jetspec", 4, False, v1, ar)
    assert untimed["segments_timed"] is False and untimed["round_ms"] > 0
    assert timed["segments_timed"] is True
    assert timed["verify_ms"] == pytest.approx(4.0)
    assert timed["other_ms"] == pytest.approx(1.0)
    head, v2_line, v1_line, foot = format_table([untimed, timed]).split("\n")
    assert all(s in head for s in SEGMENTS)
    cells = v2_line.split()
    assert cells[-1] == "True" and cells[-1 - len(SEGMENTS):-1] == \
        ["-"] * len(SEGMENTS)
    assert "4.00" in v1_line.split() and "-" not in v1_line.split()
    assert "not split" in foot
    assert "not split" not in format_table([timed])
    # the plot draws the unsplit round as one bar of its own
    ar_row = dict(untimed, method="ar", budget=0, segments_timed=False)
    assert os.path.getsize(plot([ar_row, untimed, timed],
                                str(tmp_path / "b.png"), title="t")) > 0
