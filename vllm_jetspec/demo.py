"""JetSpec generation through vLLM on the default model, next to no-spec.

    python -m vllm_jetspec.demo [--num-prompts 3] [--max-new-tokens 96] [--budget 8]

Starts vLLM (the engine this machine has: CPU here) twice on the default
target (SmolLM2-135M-Instruct, built from PyPI by ``vllm_jetspec.assets``):
once with ``speculative_config={"method": "jetspec", ...}`` and the shipped
head, once without speculation; prints each answer, tau (vLLM's mean
acceptance length: tokens per target forward, bonus token included) and
tok/s of both, and checks that greedy jetspec output equals no-spec output.
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
    llm = LLM(cfg["target"], dtype="float32", enforce_eager=True,
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
    ap = argparse.ArgumentParser(prog="python -m vllm_jetspec.demo",
                                 description=__doc__,
                                 formatter_class=argparse.
                                 RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="gsm8k")
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--budget", type=int, default=8,
                    help="tree budget (default 8: with 4, the fastest of 4/8/16/64 "
                    "on the 2-core dev CPU, docs/results.md; larger budgets "
                    "give a longer tau and cost more per round)")
    ap.add_argument("--algo", default="accum_logp")
    ap.add_argument("--head", default=None)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from . import assets
    from .eval_tau import encode_prompts
    from .heads import shipped_head_dir

    try:
        head_dir = str(args.head or shipped_head_dir())
    except FileNotFoundError as e:
        print(f"demo: {e}")
        return 2
    target = str(assets.default_model_dir())
    tok = AutoTokenizer.from_pretrained(target)
    rows = assets.load_prompts(args.prompts, limit=args.num_prompts)
    prompts = encode_prompts(rows, tok, chat=True)
    spec = {"method": "jetspec", "model": head_dir,
            "tree_budget": args.budget, "tree_algo": args.algo}
    print(f"target {target}\nhead {head_dir}\njetspec: tree {args.algo}, "
          f"budget {args.budget}; vLLM, fp32, greedy, batch 1\n", flush=True)
    base = dict(target=target, prompts=prompts,
                max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    js = run_engine(dict(base, spec=spec))
    ar = run_engine(dict(base, spec=None))
    ok = True
    for row, a, b in zip(rows, js["out"], ar["out"]):
        same = a["ids"] == b["ids"]
        ok &= same
        print("prompt:", row["prompt"][:200].replace("\n", " "))
        print("jetspec:", a["text"].strip())
        print(f"  jetspec {len(a['ids']) / a['seconds']:6.1f} tok/s | "
              f"no-spec {len(b['ids']) / b['seconds']:6.1f} tok/s | "
              f"identical to no-spec: {same}\n")
    m = js["metrics"]
    drafts = m.get("vllm:spec_decode_num_drafts", 0)
    tau = 1 + m.get("vllm:spec_decode_num_accepted_tokens", 0) / max(drafts, 1)
    n_js = sum(len(a["ids"]) for a in js["out"])
    n_ar = sum(len(b["ids"]) for b in ar["out"])
    t_js = sum(a["seconds"] for a in js["out"])
    t_ar = sum(b["seconds"] for b in ar["out"])
    print(f"overall: tau {tau:.2f} (vLLM spec-decode metrics, {drafts} "
          f"rounds) | jetspec {n_js / t_js:.1f} tok/s | no-spec "
          f"{n_ar / t_ar:.1f} tok/s | wall {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
