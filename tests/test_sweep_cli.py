"""JetSpec's profiling command line through ``python -m vllm_jetspec.tools.sweep``
(issue 23, part 3): the flags of ``jetspec_profiling_math500_tree_budget_
bsz_sweep.sh`` (JetSpec's vLLM fork) with the same names and meaning. The
engine test runs the README's command, shortened (tiny target, one sample
per dataset, 16 tokens), on CPU with TP=2 and a torch profiler trace."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from engine_io import failure
from models import make_tiny_qwen3

# JetSpec's README command (MATH-500, Qwen3-30B-A3B, TP 4), less what is
# replaced below: model paths, sizes, and --enable-expert-parallel (refused
# on CPU: tested on its own).
JETSPEC_COMMAND = [
    "--tree-attn-kernel", "triton", "--disable-cascade-attn",
    "--cudagraph-mode", "default", "--tp-size", "2",
    "--batch-sizes", "1", "--max-num-seqs", "1", "--tree-budgets", "8",
    "--max-tokens", "16", "--max-samples", "1", "--num-warmup-runs", "1",
    "--profiler", "torch", "--max-model-len", "512",
    "--max-num-batched-tokens", "1024"]


def args_of(*argv):
    from vllm_jetspec.tools.sweep import parse_args
    return parse_args(list(argv))[1]


def test_jetspec_flags_map_to_the_sweep():
    a = args_of("--model", "T", "--draft-model", "H::b16", "--profiler-dir",
                "out", "--tree-budgets", "16 32,64", "--batch-sizes", "1",
                "2", "--max-tokens", "512", "--max-samples", "0",
                "--dataset", "math-500", "humaneval", "--tp-size", "4",
                "--max-num-seqs", "2", "--num-warmup-runs", "2",
                "--max-num-batched-tokens", "16384", "--max-model-len",
                "3072", "--profiler", "torch")
    assert (a.target, a.head, a.out) == ("T", "H::b16", "out")
    assert a.budgets == [16, 32, 64] and a.batch_sizes == [1, 2]
    assert (a.max_new_tokens, a.num_prompts, a.tp_size, a.max_num_seqs,
            a.num_warmup_runs, a.max_num_batched_tokens,
            a.max_model_len) == (512, 0, 4, 2, 2, 16384, 3072)
    assert a.dataset == ["math", "humaneval"] and a.profiler == "torch"


@pytest.mark.parametrize("argv,msg", [
    (["--tree-attn-kernel", "optimus"], "no optimus kernel"),
    (["--tree-kv-layout", "logical"], "has one layout"),
    (["--dataset", "aime"], "--dataset: unknown ['aime']"),
    (["--batch-sizes", "1 x"], "'x' is not an integer"),
    (["--enable-expert-parallel"], "--enable-expert-parallel: jetspec: "
                                   "enable_expert_parallel is not supported "
                                   "by vLLM 0.26 on CPU"),
])
def test_refusals_before_any_engine(argv, msg, capsys):
    import torch
    if "--enable-expert-parallel" in argv and torch.cuda.is_available():
        pytest.skip("expert parallelism is vLLM's business on CUDA")
    with pytest.raises(SystemExit):
        args_of(*argv)
    assert msg in capsys.readouterr().err


def test_cpu_tp_binding():
    from vllm_jetspec.tools.sweep import _cpu_tp_binding
    env = {}
    _cpu_tp_binding(2, env)
    assert env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0-3|4-7"}
    _cpu_tp_binding(2, env)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3|4-7"


@pytest.mark.exclusive          # TP=2: a rank per core
@pytest.mark.engine
def test_jetspec_command_line_runs_on_cpu(tmp_path):
    """The shortened command: plain decoding and jetspec (tree budget 8) at
    TP=2 on MATH and HumanEval, each engine with a torch profiler trace of
    a few rounds; jetspec's tokens equal plain decoding's."""
    from vllm_jetspec.tools import assets
    from vllm_jetspec.head import HeadConfig, random_head, save_head

    smollm2 = assets.default_model_dir()
    # A tiny target with SmolLM2's vocabulary and tokenizer: real prompts,
    # an engine that starts in seconds.
    target = make_tiny_qwen3(tmp_path / "target", vocab=49152)
    for f in ("tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja"):
        if (smollm2 / f).exists():
            shutil.copy(smollm2 / f, target / f)
    hc = HeadConfig.for_target(target, num_layers=1, target_layer_ids=[0, 1],
                               block_size=8, intermediate_size=256)
    save_head(random_head(hc), hc, tmp_path / "head")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vllm_jetspec.tools.sweep", "--model",
           str(target), "--draft-model", str(tmp_path / "head"),
           "--profiler-dir", str(out), *JETSPEC_COMMAND,
           "--dataset", "math", "humaneval", "--baseline", "none",
           "--gpu-memory-utilization", "0.1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, failure(log)
    d = json.loads((out / "sweep.json").read_text())
    rows = d["rows"]
    assert {(r["dataset"], r["method"], r["budget"]) for r in rows} == {
        (ds, m, b) for ds in ("math", "humaneval")
        for m, b in (("ar", 0), ("jetspec", 8))}
    assert all(r["identical_to_ar"] and r["tokens"] > 0 for r in rows)
    assert d["meta"]["tp_size"] == 2 and d["meta"]["profiler"] == "torch"
    assert "no CUDA graphs on CPU" in log
    for name in ("ar", "jetspec8"):
        files = list((out / "traces" / name).rglob("*"))
        assert any(f.is_file() and f.stat().st_size > 0 for f in files), \
            (name, files)
