"""Measure tau (tokens emitted per target verify forward, bonus token
included) of a head with the reference decoder.

    python -m vllm_jetspec.tools.eval_tau --prompts gsm8k --budgets 16 64 \\
        --algos accum_logp topb_prefix chain --max-new-tokens 128 --json out.json

``--prompts`` takes a JSONL file with a ``prompt`` field or the name of a
prompt set built by ``python -m vllm_jetspec.tools.assets`` (gsm8k, humaneval,
mtbench, math500_subset311). Prompts are formatted with the target's chat
template unless ``--no-chat``. Greedy unless ``--temperature`` > 0.

The JSON holds ``{"tau": {algo: {budget: tau}}, "detail": {...}}``; tau of
a setting is total emitted tokens / total verify rounds over all prompts.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger("vllm.jetspec.eval_tau")


def load_target(path: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval(), tok


def encode_prompts(rows: list[dict], tokenizer, chat: bool) -> list[list[int]]:
    """Token ids of each row's prompt, chat-formatted when ``chat`` and the
    tokenizer has a template."""
    from .assets import format_chat

    out = []
    for r in rows:
        if chat and tokenizer.chat_template:
            out.append(tokenizer(format_chat(tokenizer, r["prompt"]),
                                 add_special_tokens=False).input_ids)
        else:
            out.append(tokenizer(r["prompt"]).input_ids)
    return out


def measure(target, head, prompts: list[list[int]], algos: list[str],
            budgets: list[int], max_new_tokens: int, width: int,
            temperature: float, eos: int | None, seed: int = 0,
            progress: bool = True) -> dict:
    from tqdm import tqdm

    from ..reference import ReferenceDecoder, SamplingConfig, TreeConfig

    tau: dict[str, dict[int, float]] = {}
    detail: dict[str, dict[int, dict]] = {}
    total = len(algos) * len(budgets) * len(prompts)
    bar = tqdm(total=total, desc="eval_tau", disable=not progress)
    for algo in algos:
        for budget in budgets:
            dec = ReferenceDecoder(target, head, TreeConfig(
                budget=budget, algo=algo, width=width))
            emitted = rounds = tokens = 0
            t0 = time.perf_counter()
            for i, ids in enumerate(prompts):
                s = SamplingConfig(temperature=temperature, seed=seed + i)
                r = dec.generate(ids, max_new_tokens, s, eos_token_id=eos)
                emitted += sum(a + 1 for a in r.accepted)
                rounds += r.num_rounds
                tokens += len(r.token_ids)
                bar.update(1)
                bar.set_postfix(algo=algo, budget=budget,
                                tau=f"{emitted / max(rounds, 1):.2f}")
            t = emitted / rounds if rounds else float("nan")
            tau.setdefault(algo, {})[budget] = t
            detail.setdefault(algo, {})[budget] = dict(
                prompts=len(prompts), rounds=rounds, emitted=emitted,
                generated_tokens=tokens,
                seconds=time.perf_counter() - t0)
    bar.close()
    return dict(tau=tau, detail=detail)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m vllm_jetspec.tools.eval_tau", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True,
                    help="JSONL path with a 'prompt' field, or a set name")
    ap.add_argument("--target", default=None,
                    help="HF target dir (default: the built SmolLM2 asset)")
    ap.add_argument("--head", default=None,
                    help="head dir (default: the shipped SmolLM2 head)")
    ap.add_argument("--budgets", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--algos", nargs="+",
                    default=["accum_logp", "topb_prefix", "chain"])
    ap.add_argument("--width", type=int, default=7)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--no-chat", action="store_true",
                    help="do not apply the chat template")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available()
                    else "cpu")
    ap.add_argument("--dtype", default="float32",
                    choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from . import assets
    from ..head import load_head
    from ..heads import shipped_head_dir
    from ..tree import TREE_ALGOS

    bad = [a for a in args.algos if a not in TREE_ALGOS]
    if bad:
        ap.error(f"unknown algos {bad}; choose from {TREE_ALGOS}")
    dtype = getattr(torch, args.dtype)
    target_dir = args.target or str(assets.default_model_dir())
    head_dir = args.head or str(shipped_head_dir())
    target, tok = load_target(target_dir, args.device, dtype)
    head = load_head(head_dir, device=args.device, dtype=dtype)
    rows = assets.load_prompts(args.prompts, limit=args.num_prompts)
    prompts = encode_prompts(rows, tok, chat=not args.no_chat)
    res = measure(target, head, prompts, args.algos, args.budgets,
                  args.max_new_tokens, args.width, args.temperature,
                  tok.eos_token_id, progress=not args.quiet)
    res["config"] = dict(prompts=args.prompts, num_prompts=len(prompts),
                         target=target_dir, head=head_dir,
                         max_new_tokens=args.max_new_tokens,
                         width=args.width, temperature=args.temperature,
                         device=args.device, dtype=args.dtype,
                         chat=not args.no_chat)
    print(f"tau (tokens per verify forward, bonus included) on "
          f"{args.prompts}, {len(prompts)} prompts:")
    print(f"{'algo':<16}" + "".join(f"{b:>9}" for b in args.budgets))
    for algo, row in res["tau"].items():
        print(f"{algo:<16}" + "".join(f"{row[b]:>9.3f}"
                                      for b in args.budgets))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
