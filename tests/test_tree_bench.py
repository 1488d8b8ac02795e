import json
import subprocess
import sys


def test_tree_bench_runs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.tree.bench", "--devices", "cpu",
         "--batch-sizes", "1", "2", "--budgets", "16", "64", "--iters", "2",
         "--json", str(out)], capture_output=True, text=True, check=True)
    assert "build ms" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2
    assert all(r["total_ms"] > 0 for r in rows)
    assert all(r["host_rows_ms"] > 0 for r in rows)      # CPU rows


def test_tree_bench_help():
    proc = subprocess.run([sys.executable, "-m", "vllm_jetspec.tree.bench",
                           "--help"], capture_output=True, text=True,
                          check=True)
    assert "--budgets" in proc.stdout
