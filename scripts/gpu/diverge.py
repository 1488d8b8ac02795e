"""Where do two engines' greedy outputs part? SmolLM2 (fp32) on GSM8K
prompts: plain decoding with vLLM's default attention backend (A), plain
decoding through jetspec's Triton tree-attention backend (B, registered as
CUSTOM), and jetspec at budgets 16 and 64 (C, D). For each pair, per prompt:
the first differing position and, from every plain-decoding run whose tokens
equal both up to there, the gap between the top-2 log-probs there (a
near-tie means kernel numerics, not a bug; the gaps of both backends side by
side).

    python scripts/gpu/diverge.py OUT_DIR [NUM_PROMPTS] [MAX_NEW]

Env: DIVERGE_KINDS (engines), DIVERGE_PROMPTS (prompt set), DIVERGE_GRAPHS=1
(torch.compile + CUDA graphs, as `bench --graphs` runs them; default eager),
DIVERGE_SEQS (max_num_seqs, default 4; 1 = the bench's batch 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def engine(kind: str, out: str, n: int, max_new: int) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_jetspec.tools import assets
    from vllm_jetspec.tools.eval_tau import encode_prompts

    target = str(assets.default_model_dir())
    from vllm_jetspec.heads import shipped_head_dir
    head = str(shipped_head_dir())
    prompts = encode_prompts(assets.load_prompts(os.environ.get("DIVERGE_PROMPTS", "gsm8k"), limit=n),
                             AutoTokenizer.from_pretrained(target), chat=True)
    kw = dict(dtype="float32",
              enforce_eager=os.environ.get("DIVERGE_GRAPHS", "0") != "1",
              gpu_memory_utilization=0.4, max_model_len=2048,
              max_num_seqs=int(os.environ.get("DIVERGE_SEQS", "4")),
              max_num_batched_tokens=2048)
    spec = None
    if kind == "plain_custom":
        from vllm.v1.attention.backends.registry import (AttentionBackendEnum,
                                                         register_backend)
        register_backend(AttentionBackendEnum.CUSTOM,
                         "vllm_jetspec.vllm_patches.triton_attention."
                         "TritonTreeAttentionBackend")
        kw["attention_config"] = {"backend": "CUSTOM"}
    elif kind.startswith("jetspec"):
        spec = {"method": "jetspec", "model": head,
                "tree_budget": int(kind[7:])}
    llm = LLM(target, speculative_config=spec, **kw)
    sp = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True,
                        logprobs=None if spec else 2)
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                       sp, use_tqdm=False)
    rows = []
    for r in res:
        o = r.outputs[0]
        gaps = None
        if o.logprobs:
            gaps = []
            for lp in o.logprobs:
                v = sorted((x.logprob for x in lp.values()), reverse=True)
                gaps.append(v[0] - v[1] if len(v) > 1 else None)
        rows.append(dict(ids=list(o.token_ids), gaps=gaps))
    with open(out, "w") as f:
        json.dump(rows, f)


def main() -> None:
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    max_new = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    os.makedirs(out, exist_ok=True)
    kinds = os.environ.get("DIVERGE_KINDS", "plain_default plain_custom "
                           "jetspec16 jetspec64").split()
    res = {}
    for k in kinds:
        path = os.path.join(out, f"{k}.json")
        p = subprocess.run([sys.executable, __file__, "--engine", k, path,
                            str(n), str(max_new)], capture_output=True,
                           text=True)
        if p.returncode:
            print(f"{k}: failed\n{(p.stdout + p.stderr)[-1500:]}")
            with open(os.path.join(out, f"{k}.log"), "w") as f:
                f.write(p.stdout + p.stderr)
            continue
        with open(path) as f:
            res[k] = json.load(f)
    report = []
    plain = [k for k in res if k.startswith("plain")]
    for a, b in [("plain_default", "plain_custom"),
                 ("plain_custom", "jetspec16"), ("plain_custom", "jetspec64"),
                 ("plain_default", "jetspec16"), ("plain_default", "jetspec64")]:
        if a not in res or b not in res:
            continue
        for i, (x, y) in enumerate(zip(res[a], res[b])):
            d = next((j for j, (u, v) in enumerate(zip(x["ids"], y["ids"]))
                      if u != v), None)
            gaps = {}
            if d is not None:
                # A plain run's gap at d speaks for this pair only where
                # that run decoded the same d tokens before it.
                for k in plain:
                    r = res[k][i]
                    if r["gaps"] and len(r["ids"]) > d and \
                            r["ids"][:d] == x["ids"][:d]:
                        gaps[k] = r["gaps"][d]
            line = dict(pair=f"{a} vs {b}", prompt=i, first_diff=d,
                        top2_gap_there=gaps.get(a, gaps.get(b)),
                        top2_gap_by_run=gaps or None)
            report.append(line)
            print(json.dumps(line))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "--engine":
        engine(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
