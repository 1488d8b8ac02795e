"""The package installs as a vLLM general plugin and loads in every vLLM
process of a real engine."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

from engine_io import result, run_script
from models import make_tiny_qwen3


def test_entry_point_is_declared():
    eps = {e.name: e.value for e in
           entry_points(group="vllm.general_plugins")}
    assert eps.get("jetspec") == "vllm_jetspec:register"


def test_register_is_cheap_and_idempotent():
    code = textwrap.dedent("""
        import sys, time
        t = time.perf_counter()
        import vllm_jetspec
        vllm_jetspec.register(); vllm_jetspec.register()
        dt = time.perf_counter() - t
        heavy = [m for m in ("torch", "vllm", "transformers")
                 if m in sys.modules]
        print(f"{dt:.4f}", ",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True,
                         capture_output=True, text=True).stdout.split()
    assert float(out[0]) < 0.1, out
    assert len(out) == 1, f"register() imported {out[1]}"


ENGINE_SCRIPT = textwrap.dedent("""
    import sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        llm = LLM(sys.argv[1], skip_tokenizer_init=True, dtype="float32",
                  enforce_eager=True, gpu_memory_utilization=0.3,
                  max_model_len=256,
                  speculative_config={"method": "ngram",
                                      "num_speculative_tokens": 3,
                                      "prompt_lookup_max": 3,
                                      "prompt_lookup_min": 1})
        out = llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3, 1, 2])],
                           SamplingParams(max_tokens=8, temperature=0,
                                          detokenize=False))
        emit("tokens", list(out[0].outputs[0].token_ids))
""")


@pytest.mark.engine
def test_plugin_loads_everywhere_and_leaves_ngram_unchanged(tmp_path):
    """With vLLM's plugins enabled, ours loads in every process of a real
    engine (front end, engine core, worker); and its patches are inert for
    other methods: ngram output with the plugin loaded equals ngram output
    with vLLM's plugins disabled."""
    model = make_tiny_qwen3(tmp_path / "tiny-qwen3")
    runs = {}
    for name, extra in (("with", {}), ("without", {"VLLM_PLUGINS": "none"})):
        res, log = run_script(tmp_path / f"engine_{name}.py", ENGINE_SCRIPT,
                              [model], env=dict(VLLM_LOGGING_LEVEL="DEBUG",
                                                **extra))
        runs[name] = result(res, "tokens", log)
        assert len(runs[name]) == 8
        pids = set(re.findall(r"vllm-jetspec \S+ registered in pid (\d+)",
                              log))
        if name == "with":
            assert "Failed to load plugin" not in log
            # Front end, engine core and worker each load general plugins.
            assert len(pids) >= 3, log[-4000:]
        else:
            assert not pids, log[-4000:]
    assert runs["with"] == runs["without"]
