"""JetSpec generation on the default model, next to plain decoding.

    python -m vllm_jetspec.demo [--num-prompts 3] [--max-new-tokens 96]

Runs the default target (SmolLM2-135M-Instruct, built from PyPI by
``vllm_jetspec.assets``) with the shipped head on a few GSM8K prompts and
prints, for each, the text, tau (tokens per target forward, bonus token
included) and tok/s of jetspec next to plain greedy decoding of the same
target. Both run through the reference decoder (transformers, batch 1):
the vLLM path (``"method": "jetspec"``) is not available yet. Greedy
jetspec output must equal plain greedy output; the demo checks it.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_jetspec.demo",
                                 description=__doc__,
                                 formatter_class=argparse.
                                 RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="gsm8k")
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--algo", default="accum_logp")
    ap.add_argument("--head", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available()
                    else "cpu")
    args = ap.parse_args(argv)

    from . import assets
    from .eval_tau import encode_prompts, load_target
    from .head import load_head
    from .heads import shipped_head_dir
    from .reference import ReferenceDecoder, TreeConfig, target_greedy

    try:
        head_dir = args.head or shipped_head_dir()
    except FileNotFoundError as e:
        print(f"demo: {e}")
        return 2
    target_dir = assets.default_model_dir()
    target, tok = load_target(str(target_dir), args.device, torch.float32)
    head = load_head(head_dir, device=args.device, dtype=torch.float32)
    rows = assets.load_prompts(args.prompts, limit=args.num_prompts)
    prompts = encode_prompts(rows, tok, chat=True)
    dec = ReferenceDecoder(target, head, TreeConfig(budget=args.budget,
                                                    algo=args.algo))
    eos = tok.eos_token_id
    print(f"target {target_dir.name}, head {head_dir}, tree "
          f"{args.algo} budget {args.budget}, device {args.device}, fp32")
    print("engine: reference decoder (transformers, batch 1)\n")
    ok = True
    tot = dict(ar_t=0.0, js_t=0.0, ar_n=0, js_n=0, emitted=0, rounds=0)
    for row, ids in zip(rows, prompts):
        t = time.perf_counter()
        ar = target_greedy(target, ids, args.max_new_tokens, eos)
        ar_t = time.perf_counter() - t
        t = time.perf_counter()
        r = dec.generate(ids, args.max_new_tokens, eos_token_id=eos)
        js_t = time.perf_counter() - t
        same = r.token_ids == ar
        ok &= same
        tot["ar_t"] += ar_t
        tot["js_t"] += js_t
        tot["ar_n"] += len(ar)
        tot["js_n"] += len(r.token_ids)
        tot["emitted"] += sum(a + 1 for a in r.accepted)
        tot["rounds"] += r.num_rounds
        print("prompt:", row["prompt"][:200].replace("\n", " "))
        print("jetspec:", tok.decode(r.token_ids, skip_special_tokens=True)
              .strip())
        print(f"  tau {r.tau:.2f} | jetspec {len(r.token_ids) / js_t:6.1f} "
              f"tok/s | no-spec {len(ar) / ar_t:6.1f} tok/s | identical to "
              f"no-spec: {same}\n")
    tau = tot["emitted"] / max(tot["rounds"], 1)
    print(f"overall: tau {tau:.2f} | jetspec {tot['js_n'] / tot['js_t']:.1f}"
          f" tok/s | no-spec {tot['ar_n'] / tot['ar_t']:.1f} tok/s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
