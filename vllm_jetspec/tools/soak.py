"""Soak: serve under load, faults and bad input, and prove nothing is lost.

    python -m vllm_jetspec.tools.soak --out DIR [--num-requests N] [--concurrency C]

Starts OpenAI-compatible vLLM servers on loopback (``python -m
vllm.entrypoints.openai.api_server``, i.e. ``vllm serve``) one after the
other: one without speculation (the reference), one with the speculative
config under test (jetspec by default), and a second one without speculation
(``--repro fresh``; ``same``: a second pass on the first server; ``none``)
to measure how reproducible vLLM itself is. Each gets the same seeded random
mix of requests through the ``openai`` client (async, bounded concurrency):
chat and completions, streaming and not, ``max_tokens`` 1-256, stop strings,
greedy and seeded sampling (temperature / top-p / top-k), requests the tree
path cannot honour (logprobs, penalties, ``logit_bias``, ``min_p``,
``min_tokens``, structured output), prompts from a few tokens to the end of
the context, client-side aborts mid-stream, bursts of long prompts (with a
small KV cache they force preemption) and bad input (malformed JSON, unknown
fields, empty prompts, prompts over ``max_model_len``, ``max_tokens`` 0 or
huge, invalid values, clients that disconnect before reading).

Compared per request, completed ones only (same parameters, same stop
strings): token ids, text and finish reason. Greedy answers must equal the
reference; seeded sampled answers must equal it wherever the two reference
runs agree with each other. For every greedy difference the first differing
token and the top-2 log-prob gap there (asked of each server with
``logprobs``) are reported. Also: failures by cause, bad inputs' HTTP
statuses (equal on both servers), tau from vLLM's spec-decode counters
(``/metrics``: 1 + accepted / drafts), preemptions, tok/s, ``/health``,
memory and running/waiting requests and KV-cache use after the pass, and
every server log line at WARNING or above. JSON in ``--out`` (``soak.json``;
``requests.jsonl`` per request; each server's log) and a one-line summary.
Exit status 0 only when the verdict is OK.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODEL_NAME = "soak"

# Bad input to the server. ``True``: a valid request that must be answered
# normally (and is compared like any other); ``False``: an HTTP 4xx is
# expected; ``None``: the client leaves before the answer.
BAD_KINDS = {
    "malformed_json": False,       # body cut mid-object
    "not_json": False,             # text/plain body
    "unknown_field": True,         # an extra top-level field (vLLM ignores it)
    "empty_prompt": False,         # completions, prompt ""
    "empty_chat_content": True,    # chat, one user message with ""
    "empty_messages": False,       # chat, no messages at all
    "prompt_too_long": False,      # prompt longer than max_model_len
    "max_tokens_0": False,
    "max_tokens_huge": False,      # 10**9
    "bad_value": False,            # temperature -1, top_p 1.5, logprobs 50...
    "wrong_type": False,           # "max_tokens": "five"
    "wrong_model": False,          # 404
    "oov_token_id": False,         # token id past the vocabulary
    "disconnect": None,            # non-streaming, client gone before reading
}

# Parameters the tree sampler cannot honour (vllm_patches/sampling.py): the
# batches they are in decode plainly on a jetspec server.
UNSUPPORTED = ["logprobs", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "logit_bias", "min_p", "min_tokens",
               "structured_regex", "structured_choice"]

STOP_POOL = [".", "\n", ",", " the", " and", "?", "e", " a", ":"]

# Synthetic prompts (``--prompts synthetic``, or when no prompt set exists):
# lower-case words, so a tokenizer of a few dozen characters covers them.
WORDS = ("the of and to in is was for on that with as by at from it an be "
         "this which or are had not but have one all were they when there "
         "can more time will two what about if some would out them many "
         "water into like then these long first made over number sound "
         "people called find write way each word could day little make "
         "work how come part much go just where most know after back good "
         "year live give only very through name great sentence think say "
         "help low line turn cause mean before move right boy old too same "
         "tell does set three want air well also play small end put home "
         "read hand port large spell add even land here must big high such "
         "follow act why ask men change went light kind off need house "
         "picture try us again animal point mother world near build self "
         "earth father head stand own page should country found answer "
         "school grow study still learn plant cover food sun four between "
         "state keep eye never last let thought city tree cross farm hard "
         "start might story saw far sea draw left late run").split()


# ---------------------------------------------------------------- the plan

@dataclass
class Req:
    """One request of the plan; identical on every pass."""
    idx: int
    api: str                          # "chat" | "cmpl"
    stream: bool
    mode: str                         # "greedy" | "seeded" | "unseeded"
    prompt: str | list[int]           # chat: the user message; cmpl: text/ids
    prompt_len: int                   # tokens as planned (chat: templated)
    length_class: str                 # short | corpus | long | fill | burst
    params: dict = field(default_factory=dict)   # openai keyword arguments
    extra: dict = field(default_factory=dict)    # vLLM's extra_body fields
    unsupported: str | None = None
    abort_after: int | None = None    # streaming: close after this many chunks
    bad: str | None = None            # a BAD_KINDS key
    raw: dict | None = None           # bad input sent as-is (path, body, type)
    block: int | None = None          # seeded block (all-seeded batches)
    barrier: bool = False             # wait for everything in flight first

    @property
    def compared(self) -> bool:
        return self.mode in ("greedy", "seeded") and (
            self.bad is None or BAD_KINDS[self.bad] is True)


def load_corpus(names: list[str], limit: int = 4000) -> list[str]:
    from . import assets

    texts: list[str] = []
    for name in names:
        if name == "synthetic":
            continue
        texts += [r["prompt"] for r in assets.load_prompts(name, limit=limit)]
    return texts


def default_prompt_sets() -> list[str]:
    from . import assets

    names = []
    for name in ("gsm8k", "sharegpt", "mtbench", "humaneval"):
        try:
            if assets.prompt_file(name).is_file():
                names.append(name)
        except Exception:  # noqa: BLE001 -- missing asset: not an error here
            pass
    return names or ["synthetic"]


class Planner:
    """Builds the seeded request mix against a tokenizer and the server's
    context length."""

    def __init__(self, args, tokenizer, corpus: list[str]):
        self.a = args
        self.tok = tokenizer
        self.rng = random.Random(args.seed)
        self.corpus = corpus
        self.L = args.max_model_len
        self.vocab = len(tokenizer)

    # token counting as the server does it
    def chat_ids(self, text: str) -> list[int]:
        out = self.tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True,
            tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def cmpl_ids(self, text: str) -> list[int]:
        return list(self.tok(text).input_ids)

    def text(self) -> str:
        if self.corpus:
            return self.rng.choice(self.corpus)
        n = self.rng.randint(5, 60)
        return " ".join(self.rng.choice(WORDS) for _ in range(n)) + "."

    def text_of_tokens(self, n: int) -> str:
        """About ``n`` tokens of running text."""
        parts, have = [], 0
        while have < n + 8:
            t = self.text()
            parts.append(t)
            have += len(self.tok(t, add_special_tokens=False).input_ids) + 2
        ids = self.tok("\n\n".join(parts), add_special_tokens=False).input_ids
        return self.tok.decode(ids[:max(1, n)])

    def fit(self, api: str, text: str, room: int) -> tuple[str, int]:
        """``text`` cut until prompt + ``room`` fits the context."""
        for _ in range(20):
            n = len(self.chat_ids(text) if api == "chat"
                    else self.cmpl_ids(text))
            if n + room <= self.L:
                return text, n
            over = n + room - self.L
            ids = self.tok(text, add_special_tokens=False).input_ids
            text = self.tok.decode(ids[:max(1, len(ids) - over - 4)])
        raise RuntimeError("could not fit a prompt into the context")

    def max_tokens(self) -> int:
        m, r = self.a.max_tokens, self.rng.random()
        if r < 0.15:
            return self.rng.randint(1, min(4, m))
        if r < 0.6:
            return self.rng.randint(1, max(1, m // 4))
        return self.rng.randint(max(1, m // 4), m)

    def sampling(self, mode: str) -> tuple[dict, dict]:
        p, x = {}, {}
        if mode == "greedy":
            p["temperature"] = 0.0
            return p, x
        p["temperature"] = self.rng.choice([0.3, 0.7, 1.0, 1.3])
        if self.rng.random() < 0.4:
            p["top_p"] = self.rng.choice([0.95, 0.8, 0.5])
        if self.rng.random() < 0.4:
            x["top_k"] = self.rng.choice([5, 20, 50])
        if mode == "seeded":
            p["seed"] = self.rng.randrange(1, 2**31)
        return p, x

    def unsupported(self, req: Req, kind: str) -> None:
        p, x, rng = req.params, req.extra, self.rng
        if kind == "logprobs":
            k = rng.randint(0, 5)
            if req.api == "chat":
                p["logprobs"], p["top_logprobs"] = True, k
            else:
                p["logprobs"] = k
        elif kind in ("presence_penalty", "frequency_penalty"):
            p[kind] = rng.choice([0.5, 1.0, -0.5])
        elif kind == "repetition_penalty":
            x[kind] = rng.choice([1.1, 1.3, 0.9])
        elif kind == "logit_bias":
            toks = rng.sample(range(min(self.vocab, 1000)), 3)
            p["logit_bias"] = {str(t): rng.choice([-100, -5, 5, 100])
                               for t in toks}
            # One strong bias: an ignored bias changes the answer.
            p["logit_bias"][str(toks[0])] = rng.choice([8, 100])
        elif kind == "min_p":
            x["min_p"] = rng.choice([0.05, 0.2])
        elif kind == "min_tokens":
            x["min_tokens"] = min(p.get("max_tokens") or 8,
                                  rng.randint(1, 8))
        elif kind == "structured_regex":
            x["structured_outputs"] = {"regex": "[a-z ]{1,40}"}
        elif kind == "structured_choice":
            x["structured_outputs"] = {"choice": ["yes", "no", "maybe so"]}
        req.unsupported = kind

    def normal(self, idx: int, length_class: str | None = None,
               mode: str | None = None, plain: bool = False) -> Req:
        """A well-formed request; ``plain``: no unsupported parameter and
        no abort."""
        a, rng = self.a, self.rng
        api = "chat" if rng.random() < a.chat_frac else "cmpl"
        stream = rng.random() < a.stream_frac
        r = rng.random()
        mode = mode or ("greedy" if r < a.greedy_frac else
                        "unseeded" if r > 1 - a.unseeded_frac else "seeded")
        if length_class is None:
            r = rng.random()
            length_class = ("fill" if r < a.fill_frac else
                            "long" if r < a.fill_frac + a.long_frac else
                            "short" if r < a.fill_frac + a.long_frac + 0.2
                            else "corpus")
        mt = self.max_tokens()
        if length_class == "burst":
            # Medium prompts, long answers, all at once: admitted together,
            # they outgrow a small KV cache while decoding (preemption).
            mt = rng.randint(max(1, a.max_tokens // 2), a.max_tokens)
        params, extra = self.sampling(mode)
        room = mt + 1
        if length_class == "short":
            words = self.text().split()
            text = " ".join(words[:rng.randint(1, 6)]) or "hi"
        elif length_class == "corpus":
            text = self.text()
        elif length_class == "long":
            free = self.L - room - 40
            text = self.text_of_tokens(int(free * rng.uniform(0.5, 0.95)))
        elif length_class == "burst":
            free = self.L - room - 40
            text = self.text_of_tokens(int(free * rng.uniform(0.2, 0.5)))
        else:  # fill: the answer runs into max_model_len
            left = rng.randint(2, min(64, a.max_tokens))
            if api == "cmpl":
                ids = self.tok(self.text_of_tokens(self.L),
                               add_special_tokens=False).input_ids
                ids = ids[:self.L - left]
                text, mt = ids, left
            else:
                text = self.text_of_tokens(self.L - left - 40)
                mt = None     # chat's default: what the context leaves
            room = left
        if isinstance(text, list):
            n = len(text)
        else:
            text, n = self.fit(api, text, room)
        if mt is not None:
            params["max_tokens"] = mt
        if rng.random() < a.stop_frac:
            params["stop"] = rng.sample(STOP_POOL, rng.randint(1, 2))
        req = Req(idx, api, stream, mode, text, n, length_class, params,
                  extra)
        if plain:
            return req
        if length_class != "burst" and rng.random() < a.unsupported_frac:
            self.unsupported(req, rng.choice(UNSUPPORTED))
        if stream and rng.random() < a.abort_frac / max(a.stream_frac, 1e-9):
            req.abort_after = rng.choice([0, 1, 2, 3, 5, 10, 20])
        return req

    def bad(self, idx: int, kind: str) -> Req:
        rng = self.rng
        short = " ".join(self.text().split()[:8]) or "hello"
        req = Req(idx, "cmpl", False, "greedy", short, 0, "short",
                  {"temperature": 0.0, "max_tokens": rng.randint(4, 32)},
                  bad=kind)
        body = {"model": MODEL_NAME, "prompt": short, "max_tokens": 8,
                "temperature": 0}
        if kind == "malformed_json":
            req.raw = dict(path="/v1/completions", type="application/json",
                           body=json.dumps(body)[:-rng.randint(2, 12)])
        elif kind == "not_json":
            req.raw = dict(path="/v1/completions", type="text/plain",
                           body=short)
        elif kind == "unknown_field":
            req.api = rng.choice(["chat", "cmpl"])
            req.stream = rng.random() < 0.5
            req.extra = {"soak_unknown_field": {"x": [1, 2]}}
        elif kind == "empty_prompt":
            req.prompt = ""
        elif kind == "empty_chat_content":
            req.api, req.prompt = "chat", ""
        elif kind == "empty_messages":
            req.raw = dict(path="/v1/chat/completions", body=json.dumps(
                {"model": MODEL_NAME, "messages": [], "max_tokens": 8}))
        elif kind == "prompt_too_long":
            n = self.L + rng.randint(1, 100)
            ids = self.tok(self.text_of_tokens(n + 20),
                           add_special_tokens=False).input_ids[:n]
            if rng.random() < 0.5:
                req.prompt, req.prompt_len = ids, len(ids)
            else:
                req.api, req.prompt = "chat", self.tok.decode(ids)
        elif kind == "max_tokens_0":
            req.params["max_tokens"] = 0
        elif kind == "max_tokens_huge":
            req.params["max_tokens"] = 10**9
        elif kind == "bad_value":
            req.params.update(rng.choice([
                {"temperature": -1.0}, {"top_p": 1.5}, {"logprobs": 50},
                {"n": 0}, {"presence_penalty": 5.0}]))
        elif kind == "wrong_type":
            req.raw = dict(path="/v1/completions", body=json.dumps(
                dict(body, max_tokens="five")))
        elif kind == "wrong_model":
            req.raw = dict(path="/v1/completions", body=json.dumps(
                dict(body, model="no-such-model")))
        elif kind == "oov_token_id":
            req.prompt = [1, 2, self.vocab + rng.randint(10, 1000)]
        elif kind == "disconnect":
            req.raw = dict(path=rng.choice(["/v1/completions",
                                            "/v1/chat/completions"]),
                           leave_after=rng.uniform(0.0, 0.3))
            if req.raw["path"].endswith("completions") and \
                    "chat" not in req.raw["path"]:
                b = dict(body, max_tokens=self.a.max_tokens, ignore_eos=True)
            else:
                b = {"model": MODEL_NAME, "max_tokens": self.a.max_tokens,
                     "temperature": 0, "ignore_eos": True,
                     "messages": [{"role": "user", "content": short}]}
            req.raw["body"] = json.dumps(b)
        else:
            raise ValueError(kind)
        return req

    def build(self) -> list[Req]:
        a, rng = self.a, self.rng
        n = a.num_requests
        kinds: list = [None] * n
        # Seeded blocks: only seeded requests in flight between two
        # barriers (vLLM's CPU sampler honours seeds only in batches where
        # every request is seeded).
        nb, bs = a.seeded_blocks, min(a.seeded_block_size, n)
        if nb > 0 and bs > 0:
            for b in range(nb):
                s0 = (b + 1) * n // (nb + 1) - bs // 2
                for i in range(max(0, s0), min(n, s0 + bs)):
                    kinds[i] = ("block", b)
        slots = [i for i in range(n) if kinds[i] is None]
        rng.shuffle(slots)
        # Every bad kind at least once when bad input is asked for.
        nbad = round(n * a.bad_frac)
        if a.bad_frac > 0:
            nbad = max(nbad, len(BAD_KINDS))
        bad = list(BAD_KINDS) + [rng.choice(list(BAD_KINDS))
                                 for _ in range(max(0, nbad - len(BAD_KINDS)))]
        for s, k in zip(slots, bad[:n]):
            kinds[s] = ("bad", k)
        # Bursts issued back to back (preemption).
        if a.burst_size > 0 and a.bursts > 0:
            k = min(a.bursts, max(1, n // (4 * a.burst_size)))
            starts = sorted(rng.sample(range(0, max(1, n - a.burst_size)), k))
            for s in starts:
                for i in range(s, min(n, s + a.burst_size)):
                    if kinds[i] is None:
                        kinds[i] = ("burst", None)
        plan = []
        for i in range(n):
            k = kinds[i]
            if k is None:
                plan.append(self.normal(i))
            elif k[0] == "burst":
                plan.append(self.normal(i, "burst"))
            elif k[0] == "block":
                r = self.normal(i, rng.choice(["short", "corpus"]),
                                mode="seeded", plain=True)
                r.block = k[1]
                prev = kinds[i - 1] if i else None
                r.barrier = prev != k
                plan.append(r)
            else:
                plan.append(self.bad(i, k[1]))
            if i and kinds[i - 1] and kinds[i - 1][0] == "block" and \
                    kinds[i] != kinds[i - 1]:
                plan[-1].barrier = True
        # Every unsupported kind and an abort at least once.
        normal = [r for r in plan if r.bad is None and r.block is None
                  and r.length_class != "burst"]
        if a.unsupported_frac > 0 and normal:
            # ... each with at least one greedy request (compared exactly).
            for kind in UNSUPPORTED:
                if any(r.unsupported == kind and r.mode == "greedy"
                       for r in normal):
                    continue
                free_greedy = [r for r in normal if r.unsupported is None
                               and r.mode == "greedy"]
                if free_greedy:
                    self.unsupported(rng.choice(free_greedy), kind)
        if a.abort_frac > 0 and normal and not any(
                r.abort_after is not None for r in normal):
            r = rng.choice(normal)
            r.stream, r.abort_after = True, rng.choice([0, 1, 3])
        return plan


def plan_stats(plan: list[Req]) -> dict:
    c = collections.Counter
    normal = [r for r in plan if r.bad is None]
    return dict(
        requests=len(plan),
        api=dict(c(r.api for r in normal)),
        stream=sum(r.stream for r in normal),
        mode=dict(c(r.mode for r in normal)),
        length_class=dict(c(r.length_class for r in normal)),
        unsupported=dict(c(r.unsupported for r in normal if r.unsupported)),
        stop_strings=sum("stop" in r.params for r in normal),
        aborts_planned=sum(r.abort_after is not None for r in normal),
        bad=dict(c(r.bad for r in plan if r.bad)),
        seeded_blocks=dict(c(r.block for r in plan if r.block is not None)),
        prompt_tokens=dict(min=min((r.prompt_len for r in normal), default=0),
                           max=max((r.prompt_len for r in normal), default=0)),
    )


# ------------------------------------------------------------- the servers

def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """One ``python -m vllm.entrypoints.openai.api_server`` process group."""

    def __init__(self, label: str, args, spec: dict | None, log: Path):
        self.label, self.spec, self.log = label, spec, log
        self.port = args.port or free_port(args.host)
        if args.port:
            args.port += 1
        self.url = f"http://{args.host}:{self.port}"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", args.model, "--served-model-name", MODEL_NAME,
               "--host", args.host, "--port", str(self.port),
               "--dtype", args.dtype,
               "--max-model-len", str(args.max_model_len),
               "--max-num-seqs", str(args.max_num_seqs), "--seed", "0"]
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer]
        if args.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens",
                    str(args.max_num_batched_tokens)]
        if args.num_gpu_blocks:
            cmd += ["--num-gpu-blocks-override", str(args.num_gpu_blocks)]
        cmd += shlex.split(args.server_args)
        if spec is not None:
            cmd += shlex.split(args.spec_server_args)
            cmd += ["--speculative-config", json.dumps(spec)]
        self.cmd = cmd
        env = dict(os.environ)
        if args.kv_cache_gb:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gb)
        for kv in args.server_env:
            k, _, v = kv.partition("=")
            env[k] = v
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.start_s = None
        self.log_end: int | None = None

    def start(self, timeout: float) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """The process, not waiting for it (``wait_ready``)."""
        self.t_launch = time.time()
        f = open(self.log, "a")
        f.write(f"# {shlex.join(self.cmd)}\n")
        f.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=f,
                                     stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        """Until ``/health`` answers 200 (``start_s``: seconds since the
        launch), the process ends (its log's end in the error) or
        ``timeout`` seconds have passed since the launch."""
        t0 = self.t_launch
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} server exited "
                                   f"({self.proc.returncode}):\n"
                                   + self.log.read_text()[-4000:])
            if self.health() == 200:
                self.start_s = time.time() - t0
                return
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"{self.label} server did not start in {timeout} s")

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        try:
            url = self.url + "/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                return parse_metrics(r.read().decode())
        except OSError:
            return {}

    def memory(self) -> dict:
        out: dict = {}
        try:
            import psutil

            p = psutil.Process(self.proc.pid)
            procs = [p] + p.children(recursive=True)
            out["rss_mb"] = round(sum(x.memory_info().rss for x in procs
                                      if x.is_running()) / 2**20, 1)
            out["processes"] = len(procs)
        except Exception as e:  # noqa: BLE001 -- report, never fail on it
            out["error"] = repr(e)
        gpu = gpu_memory()
        if gpu:
            out["gpu_used_mb"] = gpu
        return out

    def stop(self) -> None:
        """SIGTERM to the API server (it stops its engine), then SIGKILL to
        the process group if it has not ended in 60 s. Log lines written
        from here on are the shutdown's (``log_warnings``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.log_end = self.log.stat().st_size
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait()


def gpu_memory() -> list[int] | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return [int(x) for x in out.stdout.split() if x.strip().isdigit()]


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value summed over labels}."""
    out: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m or not m.group(1).startswith("vllm:"):
            continue
        try:
            out[m.group(1)] += float(m.group(3))
        except ValueError:
            pass
    return dict(out)


METRICS = ["vllm:spec_decode_num_drafts_total",
           "vllm:spec_decode_num_draft_tokens_total",
           "vllm:spec_decode_num_accepted_tokens_total",
           "vllm:num_preemptions_total", "vllm:generation_tokens_total",
           "vllm:prompt_tokens_total", "vllm:request_success_total"]
GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting",
          "vllm:kv_cache_usage_perc"]

_LOG_LEVEL = re.compile(r"^(?:\([^)]*\)\s*)?(WARNING|ERROR|CRITICAL)\b[: ]")
_LOG_PREFIX = re.compile(r"^(?:\([^)]*pid=\d+\)\s*)?(WARNING|ERROR|CRITICAL)"
                         r":?\s+(?:\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+)?")


def log_warnings(text: str) -> dict:
    """Every line at WARNING or above (and Python tracebacks' lines), and
    the distinct messages (process prefix and time stamp dropped) with
    their counts."""
    lines = []
    in_tb = False
    for line in text.splitlines():
        if _LOG_LEVEL.match(line):
            lines.append(line)
            in_tb = "Traceback" in line
        elif line.startswith("Traceback") or (in_tb and line.startswith(" ")):
            lines.append(line)
            in_tb = True
        else:
            in_tb = False
    distinct = collections.Counter(_LOG_PREFIX.sub(r"\1 ", x) for x in lines)
    return dict(count=len(lines), lines=lines,
                distinct=[dict(message=m, count=c)
                          for m, c in distinct.most_common()])


# The last lines of tree_budget "auto"'s periodic report of what it chose
# (vLLM's stats interval) kept in the report.
AUTO_LINES = 60


def server_log(s: Server) -> dict:
    """Lines at WARNING or above while the server served (start-up
    included), and separately those of its shutdown."""
    raw = s.log.read_bytes()
    end = s.log_end if s.log_end is not None else len(raw)
    text = raw[:end].decode(errors="replace")
    return dict(log=log_warnings(text),
                shutdown=log_warnings(raw[end:].decode(errors="replace")),
                auto_choices=[x for x in text.splitlines()
                              if "jetspec auto:" in x][-AUTO_LINES:],
                startup_s=s.start_s, log_file=s.log.name)


# ------------------------------------------------------------- the driver

def req_body(r: Req) -> dict:
    kw = dict(model=MODEL_NAME, **r.params)
    if r.api == "chat":
        kw["messages"] = [{"role": "user", "content": r.prompt}]
    else:
        kw["prompt"] = r.prompt
    if r.stream:
        kw["stream"] = True
        kw["stream_options"] = {"include_usage": True}
    kw["extra_body"] = dict(r.extra, return_token_ids=True)
    return kw


async def send_openai(client, r: Req) -> dict:
    import openai

    kw = req_body(r)
    ep = client.chat.completions if r.api == "chat" else client.completions
    res: dict = dict(status="ok", token_ids=[], text="", finish_reason=None,
                     prompt_token_ids=None, chunks=0)
    try:
        if not r.stream:
            resp = await ep.create(**kw)
            ch = resp.choices[0]
            res["text"] = (ch.message.content or "") if r.api == "chat" \
                else ch.text
            res["token_ids"] = list(getattr(ch, "token_ids", None) or [])
            res["finish_reason"] = ch.finish_reason
            res["stop_reason"] = getattr(ch, "stop_reason", None)
            res["prompt_token_ids"] = (
                getattr(resp, "prompt_token_ids", None)
                or getattr(ch, "prompt_token_ids", None))
            if resp.usage:
                res["completion_tokens"] = resp.usage.completion_tokens
            return res
        stream = await ep.create(**kw)
        text = []
        try:
            async for chunk in stream:
                if r.abort_after is not None and \
                        res["chunks"] >= r.abort_after:
                    res["status"] = "aborted"
                    break
                res["chunks"] += 1
                pt = getattr(chunk, "prompt_token_ids", None)
                if chunk.choices:
                    ch = chunk.choices[0]
                    pt = pt or getattr(ch, "prompt_token_ids", None)
                    text.append((ch.delta.content or "") if r.api == "chat"
                                else ch.text)
                    res["token_ids"] += list(getattr(ch, "token_ids", None)
                                             or [])
                    if ch.finish_reason:
                        res["finish_reason"] = ch.finish_reason
                        res["stop_reason"] = getattr(ch, "stop_reason", None)
                if pt and not res["prompt_token_ids"]:
                    res["prompt_token_ids"] = list(pt)
                if getattr(chunk, "usage", None):
                    res["completion_tokens"] = chunk.usage.completion_tokens
        finally:
            await stream.close()
        res["text"] = "".join(text)
        if res["status"] == "ok" and res["finish_reason"] is None:
            res.update(status="failed", cause="stream ended without a finish")
        return res
    except openai.APIStatusError as e:
        return dict(status="http_error", http_status=e.status_code,
                    error=str(e)[:300])
    except openai.APITimeoutError as e:
        return dict(status="failed", cause="timeout", error=str(e)[:300])
    except openai.APIConnectionError as e:
        return dict(status="failed", cause="connection",
                    error=repr(e.__cause__ or e)[:300])
    except openai.APIError as e:
        # An error event inside a stream (the answer had begun: HTTP 200).
        return dict(status="failed", cause="error in stream",
                    error=str(e)[:300])


async def send_raw(http, r: Req) -> dict:
    import httpx

    raw = r.raw
    headers = {"Content-Type": raw.get("type", "application/json")}
    if "leave_after" in raw:
        task = asyncio.ensure_future(http.post(
            raw["path"], content=raw["body"], headers=headers))
        await asyncio.sleep(raw["leave_after"])
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, httpx.HTTPError):
                pass
            return dict(status="disconnected")
        # Answered before the client left: fine either way.
        try:
            resp = task.result()
        except httpx.HTTPError as e:
            return dict(status="failed", cause="connection", error=repr(e))
        return dict(status="disconnected", http_status=resp.status_code)
    try:
        resp = await http.post(raw["path"], content=raw["body"],
                               headers=headers)
    except httpx.HTTPError as e:
        return dict(status="failed", cause="connection", error=repr(e)[:300])
    if resp.status_code == 200:
        return dict(status="ok", http_status=200, text=resp.text[:300])
    return dict(status="http_error", http_status=resp.status_code,
                error=resp.text[:300])


def classify(r: Req, res: dict) -> dict:
    """Turn an HTTP error into 'expected_error' (bad input answered with a
    4xx) or 'failed' (a cause)."""
    if res["status"] != "http_error":
        if r.bad and BAD_KINDS[r.bad] is False and res["status"] == "ok":
            res["note"] = "bad input answered normally"
        return res
    code = res.get("http_status", 0)
    if r.bad and BAD_KINDS[r.bad] is False and 400 <= code < 500:
        res["status"] = "expected_error"
    else:
        res["status"] = "failed"
        res["cause"] = f"HTTP {code}"
    return res


async def drive(server: Server, plan: list[Req], args, label: str) -> dict:
    import httpx
    import openai
    from tqdm import tqdm

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="soak",
                                max_retries=0, timeout=args.request_timeout)
    http = httpx.AsyncClient(base_url=server.url,
                             timeout=args.request_timeout)
    sem = asyncio.Semaphore(args.concurrency)
    results: list[dict | None] = [None] * len(plan)
    t0 = time.monotonic()
    deadline = t0 + args.time_limit
    bar = tqdm(total=len(plan), desc=label, unit="req", dynamic_ncols=True,
               file=sys.stderr, mininterval=2)
    failed = collections.Counter()
    peak = {"rss_mb": 0.0}

    async def watch():
        # In a thread: memory() runs nvidia-smi on a GPU (up to seconds),
        # which on this loop would stall every request in flight -- and a
        # stalled client lets the server's 5-s keep-alive timers run out
        # under connections it is about to reuse (a ReadError shown on a
        # loopback server with a 5-s block, docs/soak.md).
        while True:
            m = (await asyncio.to_thread(server.memory)).get("rss_mb", 0.0)
            peak["rss_mb"] = max(peak["rss_mb"], m)
            await asyncio.sleep(5)

    async def one(r: Req):
        try:
            t = time.monotonic()
            left = deadline - t
            if left <= 0:
                results[r.idx] = dict(status="cut")
                return
            coro = send_raw(http, r) if r.raw else send_openai(client, r)
            try:
                res = await asyncio.wait_for(coro, left)
            except asyncio.TimeoutError:
                res = dict(status="cut")
            res["seconds"] = round(time.monotonic() - t, 3)
            res["sent_at_s"] = round(t - t0, 3)
            res = classify(r, res)
            if res["status"] == "failed":
                failed[res.get("cause", "?")] += 1
                bar.set_postfix(failed=sum(failed.values()))
            results[r.idx] = res
        except Exception as e:  # noqa: BLE001 -- a client bug is a failure too
            results[r.idx] = dict(status="failed", cause="client exception",
                                  error=repr(e)[:300],
                                  sent_at_s=round(t - t0, 3))
        finally:
            sem.release()
            bar.update(1)

    watcher = asyncio.ensure_future(watch())
    tasks = []
    for r in plan:
        if r.barrier:
            await asyncio.gather(*tasks)
        await sem.acquire()
        if time.monotonic() > deadline:
            sem.release()
            results[r.idx] = dict(status="cut")
            bar.update(1)
            continue
        tasks.append(asyncio.ensure_future(one(r)))
    await asyncio.gather(*tasks)
    wall = time.monotonic() - t0
    watcher.cancel()
    bar.close()
    await client.close()
    await http.aclose()
    return dict(results=results, wall_s=wall, peak_rss_mb=peak["rss_mb"])


# Per-request parameters a one-token probe from the answer's prefix
# reproduces exactly (the Gumbel noise of vLLM's V2 sampler is keyed by the
# request's seed and the token's position, so a seeded draw at that position
# is the same draw; min_p and logit_bias do not depend on earlier output).
# Penalties, min_tokens and structured output depend on the output so far:
# a probe's pick says nothing there (seeded: not probed; greedy: probed for
# the gaps, cause "unprobed").
PROBE_SEEDED = (None, "logit_bias", "min_p", "logprobs")
PROBE_EXTRA_DROP = ("min_tokens", "return_token_ids", "structured_outputs")
PROBE_DROP = ("max_tokens", "stop", "stream", "stream_options", "logprobs",
              "top_logprobs", "n")


async def probe(server: Server, prompt_ids: list[int], prefix: list[int],
                timeout: float, req: Req | None = None) -> dict:
    """The server's top log-probs for the token after ``prompt + prefix``
    (plain decoding: a logprobs request never verifies a tree) and the
    token it picks there: greedy, or with ``req``'s sampling parameters and
    seed (a seeded request's draw at that position)."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="soak",
                                max_retries=0, timeout=timeout)
    # In the body as sent (extra_body: whatever the request carried, the
    # client checks no names).
    body: dict = {"temperature": 0}
    if req is not None:
        # The request's own parameters (greedy: its logit_bias, min_p, ...;
        # seeded: its sampling parameters and seed) but one token.
        body.update({k: v for k, v in req.params.items()
                     if k not in PROBE_DROP})
        body.update({k: v for k, v in req.extra.items()
                     if k not in PROBE_EXTRA_DROP})
    body["return_tokens_as_token_ids"] = True
    try:
        resp = await client.completions.create(
            model=MODEL_NAME, prompt=list(prompt_ids) + list(prefix),
            max_tokens=1, logprobs=5, extra_body=body)
        lp = resp.choices[0].logprobs
        top = lp.top_logprobs[0]
        pairs = sorted(((int(k.split(":")[1]), v) for k, v in top.items()),
                       key=lambda kv: -kv[1])
        return dict(top=[[t, round(v, 6)] for t, v in pairs],
                    gap=round(pairs[0][1] - pairs[1][1], 6)
                    if len(pairs) > 1 else None,
                    sampled=int(lp.tokens[0].split(":")[1]))
    except Exception as e:  # noqa: BLE001 -- reported, not fatal
        return dict(error=repr(e)[:300])
    finally:
        await client.close()


# ------------------------------------------------------------ comparisons

def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def answer(res: dict | None):
    if not res or res.get("status") != "ok":
        return None
    return (tuple(res.get("token_ids") or ()), res.get("text"),
            res.get("finish_reason"), res.get("stop_reason"))


def same_answer(x: tuple, y: tuple) -> tuple[bool, int]:
    """Equal answers, and the token ids one has past a stop string.

    vLLM checks stop strings in the front end, over all the tokens a step
    emitted (``IncrementalDetokenizer.update``): it cuts the text at the
    stop string but returns every token id of the step. A speculative step
    emits several tokens, so an answer cut by a stop string could carry a
    few token ids past it (and count them in ``usage``) where plain
    decoding, one token a step, carries none; the plugin's stop-string
    patch (``vllm_patches/stop_strings.py``) feeds a step's tokens one at
    a time, so none should be left. Such answers are counted apart (text,
    finish reason and stop string equal, one's token ids beginning with
    all of the other's) and fail the verdict."""
    if x == y:
        return True, 0
    if x[1:] != y[1:] or x[2] != "stop" or not isinstance(x[3], str):
        return False, 0
    a, b = (x[0], y[0]) if len(x[0]) <= len(y[0]) else (y[0], x[0])
    return b[:len(a)] == a, len(b) - len(a)


def compare(plan: list[Req], ref: list, other: list) -> dict:
    """Completed requests of both runs: greedy, seeded in the seeded blocks
    (all-seeded batches) and seeded in the mixed traffic."""
    out = {k: dict(compared=0, differ=[])
           for k in ("greedy", "seeded_block", "seeded_mixed")}
    past_stop = dict(requests=0, tokens=0)
    for r in plan:
        if not r.compared:
            continue
        x, y = answer(ref[r.idx]), answer(other[r.idx])
        if x is None or y is None:
            continue
        bucket = out["greedy" if r.mode == "greedy" else
                     "seeded_block" if r.block is not None else
                     "seeded_mixed"]
        bucket["compared"] += 1
        same, extra = same_answer(x, y)
        if same and extra:
            past_stop["requests"] += 1
            past_stop["tokens"] += extra
        if not same:
            d = first_diff(list(x[0]), list(y[0]))
            at = [t[d] if d is not None and d < len(t) else None
                  for t in (x[0], y[0])]
            bucket["differ"].append(dict(
                idx=r.idx, first_diff=d, tokens_there=at,
                len=[len(x[0]), len(y[0])],
                finish=[x[2], y[2]], stop_reason=[x[3], y[3]],
                text_equal=x[1] == y[1]))
    out["token_ids_past_stop_string"] = past_stop
    return out


def bad_table(plan: list[Req], passes: dict) -> dict:
    out: dict = {}
    for r in plan:
        if not r.bad:
            continue
        row = out.setdefault(r.bad, dict(expect={True: "answer", False: "4xx",
                                                 None: "client leaves"}[
                                                     BAD_KINDS[r.bad]],
                                         n=0, outcomes={}))
        row["n"] += 1
        for label, p in passes.items():
            res = p["results"][r.idx] or {}
            key = f"{res.get('status')}" + (f" {res['http_status']}"
                                            if res.get("http_status") else "")
            c = row["outcomes"].setdefault(label, {})
            c[key] = c.get(key, 0) + 1
    return out


FAILURE_EXAMPLES = 12


def failure_examples(plan: list[Req], res: list) -> list[dict]:
    """The first failed requests of a pass with their error (the client's
    exception or the HTTP body), when they were sent (seconds into the pass)
    and how long they took: in the pass summary, so that a run cut before
    its report (partial.json) still says why requests failed."""
    out = []
    for r, x in zip(plan, res):
        if x and x.get("status") == "failed":
            out.append(dict(idx=r.idx, cause=x.get("cause"),
                            error=x.get("error"), api=r.api, stream=r.stream,
                            bad=r.bad, sent_at_s=x.get("sent_at_s"),
                            seconds=x.get("seconds")))
    out.sort(key=lambda d: (d["sent_at_s"] is None, d["sent_at_s"] or 0))
    return out[:FAILURE_EXAMPLES]


def pass_summary(plan: list[Req], run: dict) -> dict:
    res = run["results"]
    st = collections.Counter((x or {}).get("status", "missing") for x in res)
    causes = collections.Counter(x.get("cause", "?") for x in res
                                 if x and x.get("status") == "failed")
    tokens = sum(len(x.get("token_ids") or []) for x in res
                 if x and x.get("status") in ("ok", "aborted"))
    done_tokens = sum(len(x.get("token_ids") or []) for x in res
                      if x and x.get("status") == "ok")
    return dict(
        sent=sum(1 for x in res if x and x.get("status") not in ("cut",
                                                                  "missing")),
        completed=st.get("ok", 0), aborted=st.get("aborted", 0),
        expected_errors=st.get("expected_error", 0),
        disconnected=st.get("disconnected", 0),
        cut_by_time_limit=st.get("cut", 0),
        failed=sum(causes.values()), failed_by_cause=dict(causes),
        failures=failure_examples(plan, res),
        bad_input_answered_normally=sum(1 for x in res if x and
                                        x.get("note")),
        wall_s=round(run["wall_s"], 1),
        output_tokens=tokens, completed_output_tokens=done_tokens,
        tok_s=round(tokens / max(run["wall_s"], 1e-9), 2),
        peak_rss_mb=run.get("peak_rss_mb"))


def metrics_delta(before: dict, after: dict) -> dict:
    d = {k.replace("vllm:", ""): after.get(k, 0.0) - before.get(k, 0.0)
         for k in METRICS}
    drafts = d["spec_decode_num_drafts_total"]
    d["tau"] = (round(1 + d["spec_decode_num_accepted_tokens_total"] / drafts,
                      4) if drafts else None)
    return d


async def settle(server: Server, wait: float = 60.0) -> dict:
    """Running/waiting requests and KV-cache use once the pass is over
    (aborted requests take a step or two to leave)."""
    t0 = time.time()
    while True:
        m = server.metrics()
        g = {k.replace("vllm:", ""): m.get(k) for k in GAUGES}
        if (not g["num_requests_running"] and not g["num_requests_waiting"]
                and not g["kv_cache_usage_perc"]) or time.time() - t0 > wait:
            g["settle_s"] = round(time.time() - t0, 1)
            return g
        await asyncio.sleep(1)


# -------------------------------------------------------------- the run

def device_info() -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version())
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["cpu_count"] = os.cpu_count()
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                             text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            info["gpus"] = out.stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


def run_pass(server: Server, plan: list[Req], args, label: str,
             fresh_start: bool = True) -> dict:
    if fresh_start:
        print(f"[soak] starting the {label} server: {shlex.join(server.cmd)}",
              flush=True)
        server.start(args.startup_timeout)
        print(f"[soak] {label} server up in {server.start_s:.0f} s",
              flush=True)
    mem0 = server.memory()
    before = server.metrics()
    run = asyncio.run(drive(server, plan, args, label))
    after = server.metrics()
    end = asyncio.run(settle(server))
    summary = pass_summary(plan, run)
    summary.update(
        metrics=metrics_delta(before, after), after=end,
        health=server.health(), alive=server.alive(),
        memory=dict(start=mem0, end=server.memory()),
        startup_s=round(server.start_s or 0, 1),
        speculative_config=server.spec, command=shlex.join(server.cmd))
    return dict(summary=summary, results=run["results"])


def diff_cause(d: dict) -> dict:
    """What the probes say about one difference between no-spec
    (``tokens_there[0]``) and jetspec (``[1]``): each server, asked after
    the same prefix, gives its top log-probs and its pick (greedy: its top
    token; seeded: its draw with the request's parameters and seed, the
    same noise as in the answer). ``cause``: ``flip`` (each server's pick
    is the token it produced: the two backends order a near-tie
    differently), ``reference`` (no-spec's pick is not the token it
    produced: vLLM not reproducible there), ``spec`` (jetspec's pick is not
    its own answer's token: its tree round against its plain step), ``ends``
    (one answer has no token there: finish or stop reason differ), or
    ``unprobed`` (no probe, or parameters that depend on the output so
    far: penalties, min_tokens, structured output). ``probe_deviation``: the largest difference between the
    two probes' log-probs of a token both list (the backends' disagreement
    there). ``tie_bound``, where both probes list both tokens: how far the
    two backends move one token's score against the other's, |Δ(lp_a −
    lp_b)| / temperature (1 for greedy); in a flip, the winner's margin in
    the sampler's scores (temperature-scaled logits plus the shared noise)
    is below it on both servers, so this bounds the tie."""
    ref_tok, spec_tok = d["tokens_there"]
    g = d.get("logprobs_at_diff") or {}
    top = {k: v["top"] for k, v in g.items() if v.get("top")}
    # The token each probe picked (a seeded probe's draw; greedy: its top).
    pick = {k: g[k].get("sampled", top[k][0][0]) for k in top}
    dev = bound = None
    if "spec" in top and "ref" in top:
        a, b = dict(map(tuple, top["spec"])), dict(map(tuple, top["ref"]))
        shared = [abs(a[t] - b[t]) for t in a if t in b]
        dev = round(max(shared), 6) if shared else None
        if ref_tok is not None and spec_tok is not None and all(
                t in a and t in b for t in (ref_tok, spec_tok)):
            temp = (d.get("params") or {}).get("temperature") or 1.0
            swing = (a[spec_tok] - a[ref_tok]) - (b[spec_tok] - b[ref_tok])
            bound = round(abs(swing) / temp, 6)
    if ref_tok is None or spec_tok is None:
        cause = "ends"
    elif "spec" not in top or "ref" not in top or \
            d.get("unsupported") not in PROBE_SEEDED:
        cause = "unprobed"
    elif pick["ref"] != ref_tok:
        cause = "reference"
    elif pick["spec"] != spec_tok:
        cause = "spec"
    else:
        cause = "flip"
    return dict(cause=cause, probe_deviation=dev, tie_bound=bound)


def check_verdict(report: dict, args) -> list[str]:
    bad = []
    for label, p in report["passes"].items():
        s = p
        if s["failed"]:
            first = (s.get("failures") or [{}])[0]
            bad.append(f"{label}: {s['failed']} failed {s['failed_by_cause']}"
                       + (f" (first: {first.get('error')})"
                          if first.get("error") else ""))
        if s["health"] != 200 or not s["alive"]:
            bad.append(f"{label}: unhealthy at the end (health {s['health']})")
        a = s["after"]
        if a.get("num_requests_running") or a.get("num_requests_waiting"):
            bad.append(f"{label}: requests left running/waiting {a}")
        if a.get("kv_cache_usage_perc"):
            bad.append(f"{label}: KV cache not freed ({a})")
        if s["cut_by_time_limit"] and not args.allow_cut:
            bad.append(f"{label}: {s['cut_by_time_limit']} requests cut by "
                       "the time limit")
    c = report["compare"].get("spec_vs_ref")
    if c:
        if c["greedy"]["differ"]:
            bad.append(f"{len(c['greedy']['differ'])} greedy answers differ")
        past = c["token_ids_past_stop_string"]["requests"]
        if past:
            # Plain decoding's token ids since the stop-string patch
            # (vllm_patches/stop_strings.py): any left is a difference.
            bad.append(f"{past} answers carry token ids past a stop string")
        if c["seeded_where_reproducible"]["differ"]:
            bad.append(f"{len(c['seeded_where_reproducible']['differ'])} "
                       "seeded answers differ where vLLM is reproducible")
    if report["bad_input_status_mismatch"]:
        bad.append(f"{len(report['bad_input_status_mismatch'])} bad inputs "
                   "answered differently by the two servers")
    return bad


def summary_line(report: dict) -> str:
    p = report["passes"]
    spec = p.get("spec", {})
    ref = p.get("ref", {})
    c = report["compare"].get("spec_vs_ref", {})
    rep = report["compare"].get("ref_repro")
    g = c.get("greedy", {})
    s = c.get("seeded_where_reproducible", {})
    parts = [f"soak: {report['plan']['requests']} requests"]
    if spec:
        parts.append(
            f"spec: {spec['completed']} completed, {spec['aborted']} aborted, "
            f"{spec['expected_errors']} expected errors, "
            f"{spec['disconnected']} disconnects, {spec['failed']} failed")
    if g:
        parts.append(f"greedy diffs {len(g['differ'])}/{g['compared']}")
    if s:
        parts.append(f"seeded diffs {len(s['differ'])}/{s['compared']}")
    if rep:
        same = {k: f"{v['compared'] - len(v['differ'])}/{v['compared']}"
                for k, v in rep.items() if "compared" in v}
        parts.append(f"vLLM repro greedy {same['greedy']} seeded blocks "
                     f"{same['seeded_block']} seeded mixed "
                     f"{same['seeded_mixed']}")
    if spec:
        tau = spec["metrics"].get("tau")
        parts.append(f"tau {tau:.2f}" if tau else "tau -")
        parts.append(f"tok/s spec {spec['tok_s']:.1f} "
                     f"ref {ref.get('tok_s', 0):.1f}")
        parts.append("preemptions "
                     f"{spec['metrics']['num_preemptions_total']:.0f}")
        parts.append("health " + ("ok" if spec["health"] == 200 else "BAD"))
    n_warn = sum(x["log"]["count"] for x in report["servers"].values())
    parts.append(f"warnings {n_warn}")
    parts.append("OK" if report["verdict"]["ok"] else
                 "FAIL: " + "; ".join(report["verdict"]["reasons"]))
    return " | ".join(parts)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m vllm_jetspec.tools.soak", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("servers")
    g.add_argument("--model", default=None,
                   help="target (default: SmolLM2-135M-Instruct from the "
                   "assets)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--head", default=None,
                   help="head directory for the default spec config "
                   "(default: the shipped head)")
    g.add_argument("--spec-config", default=None,
                   help="JSON speculative config of the server under test "
                   "(default: jetspec, --head, tree_budget --budget)")
    g.add_argument("--budget", default="16",
                   help="tree_budget of the default spec config (int or auto)")
    g.add_argument("--cost-model", default=None,
                   help="cost_model.json for --budget auto (written by "
                   "python -m vllm_jetspec.tools.bench on the same device; "
                   "without one, auto measures while serving)")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--max-model-len", type=int, default=1024)
    g.add_argument("--max-num-seqs", type=int, default=32)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV-cache blocks (--num-gpu-blocks-override): small "
                   "forces preemption")
    g.add_argument("--kv-cache-gb", type=float, default=None,
                   help="VLLM_CPU_KVCACHE_SPACE for CPU servers (default 1 "
                   "when no GPU)")
    g.add_argument("--server-args", default="",
                   help="extra arguments for every server, one string; "
                   "with '=' when it starts with '--': "
                   "'--server-args=--enforce-eager ...'")
    g.add_argument("--spec-server-args", default="",
                   help="extra arguments for the spec server only (e.g. "
                   "'--spec-server-args=--dtype=bfloat16' to see the "
                   "difference report work)")
    g.add_argument("--server-env", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="environment of every server (repeatable). On a GPU "
                   "jetspec runs vLLM's V2 runner, as plain vLLM does (both "
                   "sample a seeded request with noise keyed by seed and "
                   "position); with tree_budget 'auto' and a cost model "
                   "without measured tau (files before 2026-12-04) jetspec "
                   "runs V1, and VLLM_USE_V2_MODEL_RUNNER=0 is added unless "
                   "given, so that the reference samples seeds the same way")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=0,
                   help="first port (each server takes the next); 0: free "
                   "ports")
    g.add_argument("--startup-timeout", type=float, default=1200)
    g.add_argument("--chunked-prefill", action="store_true",
                   help="keep vLLM's chunked prefill on CPU (off by default "
                   "there: vLLM 0.26's CPU runner dies on a seeded request "
                   "whose prefill is chunked, 'CPU Generator does not use "
                   "offset')")
    g.add_argument("--servers", choices=["auto", "together", "sequential"],
                   default="auto",
                   help="'together': the no-spec and the jetspec server "
                   "start at once (their start-ups overlap) and both stay "
                   "up to the end, so the probes need no third server; "
                   "each gets --gpu-memory-utilization --gpu-util-each "
                   "unless --server-args sets it. The passes still run one "
                   "after another. 'sequential': one server at a time. "
                   "'auto': together on a GPU, sequential elsewhere (a "
                   "2-core CPU starts two servers no faster)")
    g.add_argument("--gpu-util-each", type=float, default=0.4,
                   help="--gpu-memory-utilization of each server with "
                   "--servers together")
    g.add_argument("--repro", choices=["fresh", "same", "none"],
                   default="fresh",
                   help="second reference run: a fresh server, a second pass "
                   "on the first one, or none")
    g = ap.add_argument_group("requests")
    g.add_argument("--num-requests", type=int, default=1000)
    g.add_argument("--concurrency", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prompts", nargs="*", default=None,
                   help="prompt sets or JSONL files ('synthetic': random "
                   "words; "
                   "default: the asset sets present)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--chat-frac", type=float, default=0.5)
    g.add_argument("--stream-frac", type=float, default=0.5)
    g.add_argument("--greedy-frac", type=float, default=0.5)
    g.add_argument("--unseeded-frac", type=float, default=0.05)
    g.add_argument("--stop-frac", type=float, default=0.25)
    g.add_argument("--unsupported-frac", type=float, default=0.12)
    g.add_argument("--abort-frac", type=float, default=0.05)
    g.add_argument("--bad-frac", type=float, default=0.05)
    g.add_argument("--long-frac", type=float, default=0.08)
    g.add_argument("--fill-frac", type=float, default=0.03)
    g.add_argument("--bursts", type=int, default=3)
    g.add_argument("--seeded-blocks", type=int, default=2,
                   help="blocks of seeded requests alone in flight (between "
                   "barriers)")
    g.add_argument("--seeded-block-size", type=int, default=None,
                   help="requests per seeded block (default 2 x concurrency)")
    g.add_argument("--judge-seeded", choices=["auto", "blocks", "all"],
                   default="auto",
                   help="seeded answers that must equal the reference where "
                   "vLLM is reproducible: those of the seeded blocks, or all "
                   "(auto: blocks on CPU, whose vLLM sampler ignores seeds in "
                   "batches with unseeded requests; all on GPUs)")
    g.add_argument("--burst-size", type=int, default=None,
                   help="long prompts per burst (default: --concurrency)")
    g = ap.add_argument_group("limits and output")
    g.add_argument("--time-limit", type=float, default=3600,
                   help="seconds per pass; then no new requests (cut)")
    g.add_argument("--allow-cut", action="store_true",
                   help="requests cut by the time limit do not fail the "
                   "verdict")
    g.add_argument("--request-timeout", type=float, default=1800)
    g.add_argument("--near-tie", type=float, default=1e-3,
                   help="a top-2 log-prob gap below this is reported a "
                   "near-tie")
    g.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.burst_size is None:
        args.burst_size = min(args.concurrency, args.max_num_seqs)
    if args.seeded_block_size is None:
        args.seeded_block_size = 2 * args.concurrency
    if not 1 <= args.max_tokens:
        ap.error("--max-tokens must be >= 1")
    return args


def _auto_on_v2(cost_model: str | None) -> bool:
    """Whether a jetspec server with ``tree_budget: "auto"`` and this cost
    model runs the V2 runner on a GPU (its file has measured tau, or there
    is none: the policy then measures while serving); a bad or missing
    file is the server's error to give."""
    from ..autobudget import has_tau
    if not cost_model:
        return True
    try:
        return has_tau(cost_model)
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from . import assets

        args.model = str(assets.default_model_dir())
    on_gpu = bool(gpu_memory())
    if args.kv_cache_gb is None and not on_gpu:
        args.kv_cache_gb = 1
    if args.judge_seeded == "auto":
        args.judge_seeded = "all" if on_gpu else "blocks"
    if on_gpu and args.budget == "auto" and not _auto_on_v2(
            args.cost_model) and not any(
            kv.startswith("VLLM_USE_V2_MODEL_RUNNER=")
            for kv in args.server_env):
        # jetspec's auto budget then runs vLLM's V1 runner (config.
        # select_runner); the reference with it
        args.server_env.append("VLLM_USE_V2_MODEL_RUNNER=0")
    if args.spec_config:
        spec = json.loads(args.spec_config)
    else:
        from ..heads import shipped_head_dir

        budget = args.budget if args.budget == "auto" else int(args.budget)
        spec = {"method": "jetspec",
                "model": str(args.head or shipped_head_dir()),
                "tree_budget": budget}
        if args.cost_model:
            spec["cost_model"] = os.path.abspath(args.cost_model)
    budget = spec.get("tree_budget", 64)
    budget = budget if isinstance(budget, int) else 64
    if args.max_num_batched_tokens is None:
        # A whole prompt per step (no chunking needed) and whole trees.
        args.max_num_batched_tokens = max(
            2048, args.max_model_len + 256,
            args.max_num_seqs * (budget + 8))
    if not on_gpu and not args.chunked_prefill:
        args.server_args = (args.server_args +
                            " --no-enable-chunked-prefill").strip()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    names = args.prompts if args.prompts else default_prompt_sets()
    planner = Planner(args, tok, load_corpus(names))
    plan = planner.build()
    stats = plan_stats(plan)
    print(f"[soak] plan: {json.dumps(stats)}", flush=True)

    servers: dict[str, Server] = {}
    runs: dict[str, dict] = {}
    together = args.servers == "together" or (args.servers == "auto"
                                              and on_gpu)
    if together and on_gpu and \
            "--gpu-memory-utilization" not in args.server_args:
        args.server_args = (args.server_args + " --gpu-memory-utilization "
                            f"{args.gpu_util_each}").strip()

    def start_together() -> tuple[Server, Server]:
        """The no-spec and the jetspec server launched at once, then waited
        for (their start-ups overlap)."""
        both = (Server("no-spec", args, None, out / "server_ref.log"),
                Server("jetspec", args, spec, out / "server_spec.log"))
        for key, srv in zip(("ref", "spec"), both):
            servers[key] = srv
            print(f"[soak] starting the {srv.label} server: "
                  f"{shlex.join(srv.cmd)}", flush=True)
            srv.launch()
        for srv in both:
            srv.wait_ready(args.startup_timeout)
            print(f"[soak] {srv.label} server up in {srv.start_s:.0f} s",
                  flush=True)
        return both

    def save_partial() -> None:
        """Each pass's summary as soon as it is done (a run cut short, e.g.
        by a device call's limit, still reports)."""
        with open(out / "partial.json", "w") as f:
            json.dump(dict(plan=stats, spec_config=spec, config=vars(args),
                           passes={k: v["summary"] for k, v in runs.items()}),
                      f, indent=1, default=str)

    def pass_on(key: str, label: str, spec_cfg, reuse: str | None = None):
        if reuse:
            srv = servers[reuse]
            runs[key] = run_pass(srv, plan, args, label, fresh_start=False)
        else:
            srv = Server(label, args, spec_cfg, out / f"server_{key}.log")
            servers[key] = srv
            try:
                runs[key] = run_pass(srv, plan, args, label)
            except Exception:
                srv.stop()
                raise
        save_partial()
        return srv

    gaps: dict = {}

    def probe_diffs(srv: Server, key: str, diffs: list[dict],
                    base: list, which: str = "spec") -> None:
        """Top log-probs and the token picked at each difference of
        comparison ``which`` ("spec": jetspec vs no-spec; "repro": no-spec
        vs no-spec), asked of ``srv`` (``key``: its backend, "spec" or
        "ref"); seeded answers with their own parameters and seed."""
        for d in diffs:
            res = base[d["idx"]]
            r = plan[d["idx"]]
            if d["first_diff"] is None or not res.get("prompt_token_ids"):
                continue
            if r.mode == "seeded" and r.unsupported not in PROBE_SEEDED:
                continue
            p = asyncio.run(probe(srv, res["prompt_token_ids"],
                                  res["token_ids"][:d["first_diff"]],
                                  args.request_timeout, r))
            gaps.setdefault((which, d["idx"]), {})[key] = p

    repro: dict = {}

    def spec_diffs(c: dict) -> list[dict]:
        """Greedy differences of a comparison, and the seeded ones the
        verdict judges (its buckets, where no-spec reproduced itself when
        that is known yet): those get probed for their cause."""
        buckets = (["seeded_block"] if args.judge_seeded == "blocks" else
                   ["seeded_block", "seeded_mixed"])
        irrepro = {d["idx"] for k in buckets
                   for d in (repro.get("c") or {}).get(k, {}).get("differ",
                                                                  [])}
        return c["greedy"]["differ"] + [d for k in buckets
                                        for d in c[k]["differ"]
                                        if d["idx"] not in irrepro]

    t_start = time.time()
    try:
        if together:
            ref, spec_srv = start_together()
            runs["ref"] = run_pass(ref, plan, args, "no-spec",
                                   fresh_start=False)
            save_partial()
        else:
            ref = pass_on("ref", "no-spec", None)
        if args.repro == "same":
            runs["ref2"] = run_pass(ref, plan, args, "no-spec (2nd pass)",
                                    fresh_start=False)
            save_partial()
            c1 = compare(plan, runs["ref"]["results"], runs["ref2"]["results"])
            repro["c"] = c1
            probe_diffs(ref, "ref", c1["greedy"]["differ"],
                        runs["ref"]["results"], "repro")
        if together:
            runs["spec"] = run_pass(spec_srv, plan, args, "jetspec",
                                    fresh_start=False)
            save_partial()
        else:
            ref.stop()
            spec_srv = pass_on("spec", "jetspec", spec)
        c0 = compare(plan, runs["ref"]["results"], runs["spec"]["results"])
        probe_diffs(spec_srv, "spec", spec_diffs(c0),
                    runs["ref"]["results"])
        spec_srv.stop()
        if together and args.repro != "fresh":
            # The no-spec backend's gap at each difference, from the
            # server that is still up.
            probe_diffs(ref, "ref", spec_diffs(c0), runs["ref"]["results"])
            ref.stop()
        elif args.repro == "fresh":
            ref.stop()
            ref2 = pass_on("ref2", "no-spec (2nd server)", None)
            c1 = compare(plan, runs["ref"]["results"], runs["ref2"]["results"])
            repro["c"] = c1
            probe_diffs(ref2, "ref", spec_diffs(c0),
                        runs["ref"]["results"])
            probe_diffs(ref2, "ref", c1["greedy"]["differ"],
                        runs["ref"]["results"], "repro")
            ref2.stop()
        elif spec_diffs(c0):
            # The no-spec backend's gap at each difference: a server
            # started again for the probes only.
            srv = Server("no-spec (probes)", args, None,
                         out / "server_probe.log")
            servers["probe"] = srv
            print("[soak] starting a no-spec server for the probes",
                  flush=True)
            srv.start(args.startup_timeout)
            probe_diffs(srv, "ref", spec_diffs(c0),
                        runs["ref"]["results"])
            srv.stop()
    finally:
        for s in servers.values():
            s.stop()

    res_ref = runs["ref"]["results"]
    res_spec = runs["spec"]["results"]
    c_spec = compare(plan, res_ref, res_spec)
    comp: dict = {}
    judged = (["seeded_block"] if args.judge_seeded == "blocks" else
              ["seeded_block", "seeded_mixed"])
    if "ref2" in runs:
        rep = compare(plan, res_ref, runs["ref2"]["results"])
        comp["ref_repro"] = rep
        irreproducible = {d["idx"] for k in judged
                          for d in rep[k]["differ"]}
        ref2_done = {r.idx for r in plan
                     if answer(runs["ref2"]["results"][r.idx]) is not None}
    else:
        irreproducible, ref2_done = set(), None

    def judged_req(idx: int) -> bool:
        return idx not in irreproducible and (ref2_done is None
                                              or idx in ref2_done)
    seeded_rep = [d for k in judged for d in c_spec[k]["differ"]
                  if judged_req(d["idx"])]
    n_seeded_rep = sum(1 for r in plan if r.mode == "seeded" and r.compared
                       and (r.block is not None or "seeded_mixed" in judged)
                       and answer(res_ref[r.idx]) and answer(res_spec[r.idx])
                       and judged_req(r.idx))
    comp["spec_vs_ref"] = dict(
        greedy=c_spec["greedy"], seeded_block=c_spec["seeded_block"],
        seeded_mixed=c_spec["seeded_mixed"],
        token_ids_past_stop_string=c_spec["token_ids_past_stop_string"],
        seeded_where_reproducible=dict(judged=judged, compared=n_seeded_rep,
                                       differ=seeded_rep))
    # Details of every greedy difference (both comparisons).
    for which, c in [("spec", c_spec)] + ([("repro", comp["ref_repro"])]
                                          if "ref_repro" in comp else []):
        for d in c["greedy"]["differ"]:
            r = plan[d["idx"]]
            d.update(api=r.api, stream=r.stream, unsupported=r.unsupported,
                     bad=r.bad, params=r.params, extra=r.extra,
                     prompt_len=r.prompt_len)
            g = gaps.get((which, d["idx"]), {})
            d["logprobs_at_diff"] = g
            gs = [v.get("gap") for v in g.values() if v.get("gap") is not None]
            d["near_tie"] = bool(gs) and max(gs) < args.near_tie
            if which == "spec":
                d.update(diff_cause(d))
    # Seeded differences: what the same probes (with each request's own
    # parameters and seed) say; judged by seeded_where_reproducible only.
    for k in ("seeded_block", "seeded_mixed"):
        for d in c_spec[k]["differ"]:
            r = plan[d["idx"]]
            d.update(params=r.params, extra=r.extra,
                     unsupported=r.unsupported, api=r.api)
            g = gaps.get(("spec", d["idx"]))
            if g:           # probed: judged, and no-spec reproduced itself
                d["logprobs_at_diff"] = g
                d.update(diff_cause(d))
    mism = []
    for r in plan:
        if not r.bad:
            continue
        a = (res_ref[r.idx] or {}).get("http_status")
        b = (res_spec[r.idx] or {}).get("http_status")
        sa = (res_ref[r.idx] or {}).get("status")
        sb = (res_spec[r.idx] or {}).get("status")
        if (sa, a) != (sb, b) and not (sa == sb == "disconnected"):
            mism.append(dict(idx=r.idx, bad=r.bad, ref=[sa, a], spec=[sb, b]))
    labels = {"ref": "no-spec", "spec": "spec", "ref2": "no-spec-2"}
    passes = {k: runs[k]["summary"] for k in runs}
    report = dict(
        tool="python -m vllm_jetspec.tools.soak",
        date=datetime.datetime.now().astimezone().isoformat(
            timespec="seconds"),
        command=shlex.join(["python", "-m", "vllm_jetspec.tools.soak"] + list(
            sys.argv[1:] if argv is None else argv)),
        device=device_info(), config=vars(args), spec_config=spec,
        prompt_sets=names, plan=stats, passes=passes, compare=comp,
        bad_input=bad_table(plan, {labels[k]: runs[k] for k in runs}),
        bad_input_status_mismatch=mism,
        servers={k: server_log(s) for k, s in servers.items()},
        wall_s=round(time.time() - t_start, 1))
    reasons = check_verdict(report, args)
    report["verdict"] = dict(ok=not reasons, reasons=reasons)
    report["summary"] = summary_line(report)
    with open(out / "soak.json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(out / "requests.jsonl", "w") as f:
        for r in plan:
            row = asdict(r)
            if isinstance(row["prompt"], str) and len(row["prompt"]) > 200:
                row["prompt"] = row["prompt"][:200] + "..."
            elif isinstance(row["prompt"], list) and len(row["prompt"]) > 50:
                row["prompt"] = row["prompt"][:50] + ["..."]
            row["results"] = {k: runs[k]["results"][r.idx] for k in runs}
            f.write(json.dumps(row, default=str) + "\n")
    for c, name in ((c_spec, "spec vs no-spec"),
                    (comp.get("ref_repro"), "no-spec vs no-spec")):
        for kind in ("greedy", "seeded_block", "seeded_mixed"):
            for d in (c or {}).get(kind, {}).get("differ", []):
                if kind != "greedy" and "cause" not in d:
                    continue
                cause = (f", cause {d['cause']} (probes differ by up to "
                         f"{d['probe_deviation']} nats, tie bound "
                         f"{d['tie_bound']})" if "cause" in d else "")
                print(f"[soak] {kind} difference ({name}) request "
                      f"{d['idx']}: first differing token {d['first_diff']}"
                      f", logprobs there "
                      f"{json.dumps(d.get('logprobs_at_diff'))}{cause}",
                      flush=True)
    print(report["summary"], flush=True)
    return 0 if report["verdict"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
