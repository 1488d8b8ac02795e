"""``python -m vllm_jetspec.tools.cpu_gemm``: vLLM's CPU GEMM timed at a model's
linear shapes (tiny config here; no engine)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")


def test_shapes_and_rows(tmp_path, capsys):
    from vllm_jetspec.tools.cpu_gemm import linear_shapes, main

    cfg = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
               vocab_size=300)
    layer, head = linear_shapes(cfg)
    assert layer == [(64, (4 + 4) * 16), (64, 64), (64, 192), (96, 64)]
    assert head == (64, 300)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "gemm.json"
    assert main(["--model", str(tmp_path), "--rows", "2", "1", "--iters",
                 "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 2]
    assert rows[0]["vs_one_row"] == 1.0
    for r in rows:
        assert r["total_ms"] == pytest.approx(r["layers_ms"] + r["lm_head_ms"],
                                              abs=0.02)
    assert "vs 1 row" in capsys.readouterr().out
