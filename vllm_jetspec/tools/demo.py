"""JetSpec generation through vLLM on the default model, next to no-spec.

    python -m vllm_jetspec.tools.demo [--num-prompts 3] [--max-new-tokens 96] [--budget 8]

Starts vLLM (the engine this machine has) on the default target
(SmolLM2-135M-Instruct, built from PyPI by ``vllm_jetspec.tools.assets``): once
with ``speculative_config={"method": "jetspec", ...}`` and the shipped head,
once without speculation, and on a GPU also with vLLM's own linear
``"method": "dflash"`` and the same head; prints each answer, tau (vLLM's
mean acceptance length: tokens per target forward, bonus token included)
and tok/s of each, and checks that greedy jetspec output equals no-spec
output. On a GPU the engines compile and capture CUDA graphs (vLLM's
default); on vLLM's CPU platform they run eagerly, and the demo says in one
line why that CPU shows correctness rather than speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ENGINE = """
import json, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    cfg = json.loads(sys.argv[1])
    llm = LLM(cfg["target"], dtype="float32", enforce_eager=cfg["eager"],
              gpu_memory_utilization=0.3, max_model_len=2048,
              max_num_seqs=4, max_num_batched_tokens=1024,
              speculative_config=cfg["spec"], disable_log_stats=False)
    sp = SamplingParams(max_tokens=cfg["max_new_tokens"], temperature=0)
    out = []
    for ids in cfg["prompts"]:
        t = time.perf_counter()
        o = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp,
                         use_tqdm=False)[0].outputs[0]
        out.append(dict(ids=list(o.token_ids), text=o.text,
                        seconds=time.perf_counter() - t))
    m = {x.name: x.value for x in llm.get_metrics()
         if x.name.startswith("vllm:spec_decode_num") and hasattr(x, "value")}
    # A file, not stdout: the engine-core process logs to the same pipe.
    with open(cfg["out"], "w") as f:
        json.dump(dict(out=out, metrics=m), f)
"""


def run_engine(cfg: dict) -> dict:
    fd, path = tempfile.mkstemp(prefix="jetspec_demo_", suffix=".json")
    os.close(fd)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", ENGINE, json.dumps(dict(cfg, out=path))],
            capture_output=True, text=True)
        with open(path) as f:
            text = f.read()
    finally:
        os.unlink(path)
    if proc.returncode or not text:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"demo: the vLLM engine failed ({proc.returncode})")
    return json.loads(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_jetspec.tools.demo",
                                 description=__doc__,
                                 formatter_class=argparse.
                                 RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="gsm8k")
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--budget", type=int, default=None,
                    help="tree budget (default on CPU 8: with 4, the fastest "
                    "of 4/8/16/64 on the 2-core dev CPU, docs/results.md; "
                    "larger budgets give a longer tau and cost more per "
                    "round; on a GPU 16)")
    ap.add_argument("--algo", default="accum_logp")
    ap.add_argument("--head", default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from . import assets
    from .eval_tau import encode_prompts
    from ..head import HeadConfig
    from ..heads import shipped_head_dir

    try:
        head_dir = str(args.head or shipped_head_dir())
    except FileNotFoundError as e:
        print(f"demo: {e}")
        return 2
    on_gpu = torch.cuda.is_available()
    if args.budget is None:
        args.budget = 16 if on_gpu else 8
    target = str(assets.default_model_dir())
    tok = AutoTokenizer.from_pretrained(target)
    rows = assets.load_prompts(args.prompts, limit=args.num_prompts)
    prompts = encode_prompts(rows, tok, chat=True)
    depth = HeadConfig.from_json(head_dir).block_size - 1
    engines = {"jetspec": {"method": "jetspec", "model": head_dir,
                           "tree_budget": args.budget,
                           "tree_algo": args.algo}}
    if on_gpu:
        # vLLM's own linear drafting with the same head: the baseline a
        # tree has to beat.
        engines["dflash"] = {"method": "dflash", "model": head_dir,
                             "num_speculative_tokens": depth}
    engines["no-spec"] = None
    where = (f"{torch.cuda.get_device_name(0)}, CUDA graphs" if on_gpu
             else "vLLM's CPU platform, eager")
    print(f"target {target}\nhead {head_dir}\njetspec: tree {args.algo}, "
          f"budget {args.budget}"
          + (f"; dflash: {depth} draft tokens" if on_gpu else "")
          + f"; vLLM on {where}, fp32, greedy, batch 1\n", flush=True)
    base = dict(target=target, prompts=prompts,
                max_new_tokens=args.max_new_tokens, eager=not on_gpu)
    t0 = time.perf_counter()
    res = {name: run_engine(dict(base, spec=spec))
           for name, spec in engines.items()}
    ar = res["no-spec"]
    ok = True
    for i, row in enumerate(rows):
        a, b = res["jetspec"]["out"][i], ar["out"][i]
        same = a["ids"] == b["ids"]
        ok &= same
        print("prompt:", row["prompt"][:200].replace("\n", " "))
        print("jetspec:", a["text"].strip())
        print("  " + " | ".join(
            f"{name} {len(r['out'][i]['ids']) / r['out'][i]['seconds']:6.1f}"
            f" tok/s" for name, r in res.items())
            + f" | identical to no-spec: {same}"
            + ("" if same else f" (first difference at token "
               f"{_first_difference(a['ids'], b['ids'])})") + "\n")
    parts = []
    for name, r in res.items():
        n = sum(len(o["ids"]) for o in r["out"])
        t = sum(o["seconds"] for o in r["out"])
        if name != "no-spec":
            m = r["metrics"]
            drafts = m.get("vllm:spec_decode_num_drafts", 0)
            tau = 1 + m.get("vllm:spec_decode_num_accepted_tokens", 0) \
                / max(drafts, 1)
            parts.append(f"{name} tau {tau:.2f} ({drafts} rounds), "
                         f"{n / t:.1f} tok/s")
        else:
            parts.append(f"no-spec {n / t:.1f} tok/s")
    # The first field after "overall: tau" is jetspec's tau (tests read it).
    print("overall: tau " + parts[0].split(" tau ", 1)[1] + " | "
          + " | ".join(parts[1:])
          + f" | wall {time.perf_counter() - t0:.0f} s")
    if not on_gpu:
        print(cpu_note())
    elif not ok:
        print("demo: on CUDA jetspec's tree attention computes fp32 dot "
              "products in IEEE and vLLM's default backend in TF32: greedy "
              "outputs can part where the top two logits nearly tie "
              "(scripts/gpu/diverge.py shows the gap there)")
    return 0 if ok else 1


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                min(len(a), len(b)))


def cpu_note() -> str:
    """One line: why this CPU shows correctness, not speed."""
    import torch

    from . import cpu_model
    isa = torch.backends.cpu.get_cpu_capability()
    name = cpu_model()
    if "AVX512" not in isa and "AMX" not in isa:
        return (f"demo: this CPU ({name}, {isa}, no AVX-512) is for "
                f"correctness, not speed: in vLLM's CPU kernels a verify "
                f"step of a few tokens costs more than the plain step it "
                f"replaces (two rows 2.7x one on an AVX2 EPYC, 2026-12-01; "
                f"python -m vllm_jetspec.tools.cpu_gemm measures it here), so "
                f"speculation cannot pay; on a machine with an NVIDIA GPU "
                f"scripts/demo.sh runs CUDA vLLM")
    return (f"demo: this CPU ({name}, {isa}) is for correctness, not "
            f"speed: speculation pays only where a verify step of a few "
            f"tokens costs about one plain step, which vLLM's CPU GEMM does "
            f"not guarantee (python -m vllm_jetspec.tools.cpu_gemm measures it "
            f"here; README: 1.25x no-spec on an AVX-512 Xeon, 0.73x on an "
            f"AVX2 EPYC); on a machine with an NVIDIA GPU scripts/demo.sh "
            f"runs CUDA vLLM")


if __name__ == "__main__":
    raise SystemExit(main())
