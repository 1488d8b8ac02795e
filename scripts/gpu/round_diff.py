"""Where does a jetspec engine's round structure part from the reference
decoder's (the engine test's oracle, ``vllm_jetspec.reference``), and why?

The engine test `test_greedy_equals_no_spec[accum_logp-64-None]` on the H200
(V2 runner, graphs, 2026-12-03) gave the no-spec tokens in 232 tree rounds
where the oracle on the CPU makes 231. Tokens equal, so the target agreed
everywhere; a different round count means some round accepted another
number of drafts, i.e. the two trees of that round held different nodes on
the target's greedy path. This script shows which round and how close that
was to a tie:

1. the engine as the test runs it (same prompts, settings and batch), its
   tokens round by round (one delta per engine step: 1 + accepted);
2. the oracle on the CPU (float32), and the same decoder on the GPU
   (float32, TF32 off), round by round;
3. at each prompt's first round where the engine and the CPU oracle accept
   different counts: the depth where the trees part, the head's log-prob of
   the target's token there, the smallest change of that one log-prob that
   makes the CPU tree accept what the engine accepted (binary search through
   the tree core), the top-K cut of that depth (the K-th and (K+1)-th
   log-probs and the target token's rank: a token on the cut with a gap of
   float rounding is in one device's top-K and not in the other's), the
   head's largest log-prob difference between the GPU and the CPU for the
   same context (IEEE fp32 and TF32 matmuls), and what the trees from the
   GPU's log-probs accept.

A margin of the order of float32 rounding (≲ 1e-5 nats on sums of ≈ 10) with
the GPU's head moving the log-probs by more than that is a near-tie; a
margin of 0.01 nats or more is a bug.

    python scripts/gpu/round_diff.py TINY_DIR OUT_DIR [BUDGET] [ALGO]

TINY_DIR: the engine test's tiny target + head (``shared-jetspec-tiny``
under its pytest base directory); trained there as the test does if absent.
JETSPEC_TEST_EAGER=0 runs the engine with CUDA graphs, as the GPU engine
tests do.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

# The engine's core process is spawned, not forked: this process may have
# touched CUDA already (a forked child then cannot initialise it).
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

MAX_NEW = 48


def tiny_models(d: Path) -> tuple[Path, Path]:
    from test_jetspec_engine import train_tiny

    if not (d / ".done").exists():
        d.mkdir(parents=True, exist_ok=True)
        train_tiny(d)
        (d / ".done").touch()
    return d / "target", d / "head"


def engine_rounds(target: Path, head: Path, prompts, budget: int,
                  algo: str) -> dict:
    """Per prompt the engine's output tokens and its deltas (tokens a step
    gave the request: the first from the prefill, then 1 + accepted)."""
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    eager = os.environ.get("JETSPEC_TEST_EAGER") != "0"
    llm = LLM(str(target), skip_tokenizer_init=True, dtype="float32",
              enforce_eager=eager, gpu_memory_utilization=0.3,
              max_model_len=512, max_num_batched_tokens=512, max_num_seqs=4,
              enable_prefix_caching=True, disable_log_stats=False,
              speculative_config={"method": "jetspec", "model": str(head),
                                  "tree_budget": budget, "tree_algo": algo})
    eng = llm.llm_engine
    sp = SamplingParams(max_tokens=MAX_NEW, temperature=0, detokenize=False,
                        output_kind=RequestOutputKind.DELTA)
    for j, p in enumerate(prompts):
        eng.add_request(str(j), {"prompt_token_ids": p}, sp)
    tokens = {str(j): [] for j in range(len(prompts))}
    deltas = {str(j): [] for j in range(len(prompts))}
    while eng.has_unfinished_requests():
        for out in eng.step():
            new = list(out.outputs[0].token_ids)
            if new:
                tokens[out.request_id] += new
                deltas[out.request_id].append(len(new))
    metrics = {x.name: getattr(x, "value", None) or getattr(x, "values", None)
               for x in llm.get_metrics()
               if x.name.startswith("vllm:spec_decode_num")}
    llm.llm_engine.engine_core.shutdown()
    del llm
    return dict(tokens=[tokens[str(j)] for j in range(len(prompts))],
                deltas=[deltas[str(j)] for j in range(len(prompts))],
                metrics=metrics)


class Recorder:
    """The oracle's rounds with what built their trees: the head's
    context and anchor, and the (log-prob, id) top-K the tree came from."""

    def __init__(self):
        import vllm_jetspec.reference as ref
        self.ref = ref
        self.rounds: list[dict] = []
        self._build = ref.build_tree

        def build(v, i, anchor, budget, algo):
            self.rounds[-1].update(v=v[0].cpu(), i=i[0].cpu())
            return self._build(v, i, anchor, budget, algo=algo)
        ref.build_tree = build

    def decoder(self, target, head, budget, algo):
        ref, rec = self.ref, self

        class Dec(ref.ReferenceDecoder):
            def _round(self, ctx, anchor, p, *a):
                rec.rounds.append(dict(ctx=ctx.cpu(), anchor=anchor, p=p))
                return super()._round(ctx, anchor, p, *a)

        return Dec(target, head, ref.TreeConfig(budget=budget, algo=algo))

    def close(self):
        self.ref.build_tree = self._build


def accepted_len(v, i, anchor, greedy, budget, algo) -> int:
    """Drafts the tree built from (v, i) accepts when the target's tokens
    after the anchor are ``greedy``."""
    from vllm_jetspec.tree import build_tree

    t = build_tree(v[None], i[None], torch.tensor([anchor]), budget,
                   algo=algo)
    n = int(t.num_nodes[0])
    tok, par = t.tokens[0, :n].tolist(), t.parents[0, :n].tolist()
    node, a = 0, 0
    for g in greedy:
        kids = [c for c in range(1, n) if par[c] == node and tok[c] == g]
        if not kids:
            break
        node, a = kids[0], a + 1
    return a


def margin(v, i, anchor, greedy, budget, algo, d: int, want: int) -> dict:
    """The smallest change of the head's log-prob of the target's token at
    depth ``d`` (1-based) that makes the tree accept ``want`` drafts
    (None if that token is not among the depth's top-K: then no change of
    its log-prob can put it in the tree)."""
    hit = (i[d - 1] == greedy[d - 1]).nonzero()
    if not len(hit):
        return dict(depth=d, in_top_k=False)
    k = int(hit[0, 0])
    base = accepted_len(v, i, anchor, greedy, budget, algo)

    def acc(delta):
        w = v.clone()
        w[d - 1, k] += delta
        return accepted_len(w, i, anchor, greedy, budget, algo)

    out = dict(depth=d, in_top_k=True, logp=float(v[d - 1, k]),
               rank_in_depth=k, cpu_accepts=base)
    for sign in (1.0, -1.0):
        lo, hi = 0.0, 64.0
        if acc(sign * hi) == base:
            continue
        for _ in range(80):
            mid = (lo + hi) / 2
            if acc(sign * mid) == base:
                lo = mid
            else:
                hi = mid
        out["delta"] = sign * hi
        out["accepts_after_delta"] = acc(sign * hi)
        if out["accepts_after_delta"] == want:
            break
    return out


def width_cut(logp_row: torch.Tensor, K: int, token: int) -> dict:
    """The top-K cut of one depth's log-probs (the tree only ever sees a
    depth's K best tokens): the K-th and (K+1)-th entries, the gap between
    them, and the rank of the target's ``token`` (a token at rank K-1 or K
    with a gap of float rounding is in one device's top-K and not in the
    other's)."""
    v, i = logp_row.sort(descending=True, stable=True)
    rank = int((i == token).nonzero()[0, 0])
    return dict(rank_of_target_token=rank,
                kth=[int(i[K - 1]), float(v[K - 1])],
                next=[int(i[K]), float(v[K])],
                gap=float(v[K - 1] - v[K]),
                top=[[int(a), round(float(b), 6)]
                     for a, b in zip(i[:K + 2], v[:K + 2])])


def main() -> None:
    tiny = Path(sys.argv[1])
    out = Path(sys.argv[2])
    budget = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    algo = sys.argv[4] if len(sys.argv) > 4 else "accum_logp"
    out.mkdir(parents=True, exist_ok=True)
    from test_jetspec_engine import PROMPTS
    from transformers import AutoModelForCausalLM

    from vllm_jetspec.head import load_head

    target_dir, head_dir = tiny_models(tiny)
    eng = engine_rounds(target_dir, head_dir, PROMPTS, budget, algo)
    engine_acc = [[n - 1 for n in ds[1:]] for ds in eng["deltas"]]
    print("engine:", json.dumps(eng["metrics"]), flush=True)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rec = Recorder()
    runs = {}
    for dev in ["cpu"] + (["cuda"] if cuda else []):
        target = AutoModelForCausalLM.from_pretrained(target_dir).float()
        head = load_head(head_dir)
        dec = rec.decoder(target.to(dev).eval(), head.to(dev).eval(),
                          budget, algo)
        per = []
        for p in PROMPTS:
            rec.rounds = []
            r = dec.generate(p, MAX_NEW)
            per.append(dict(tokens=r.token_ids, accepted=r.accepted,
                            rounds=rec.rounds))
        runs[dev] = per
    rec.close()
    head_gpu = load_head(head_dir).to("cuda").eval() if cuda else None
    tgt_cpu = AutoModelForCausalLM.from_pretrained(target_dir).float().eval()
    tgt_gpu = (AutoModelForCausalLM.from_pretrained(target_dir).float()
               .to("cuda").eval() if cuda else None)

    report = dict(budget=budget, algo=algo, engine_metrics=eng["metrics"],
                  prompts=[])
    for j, p in enumerate(PROMPTS):
        cpu = runs["cpu"][j]
        row = dict(prompt=j, prompt_len=len(p),
                   tokens_equal=eng["tokens"][j] == cpu["tokens"],
                   engine=engine_acc[j], cpu=cpu["accepted"])
        if cuda:
            row["cuda"] = runs["cuda"][j]["accepted"]
        # What the oracle's rounds give the request: its last round may
        # accept more than max_tokens leaves room for (the engine's delta
        # is cut there).
        cut, n = [], 1
        for a in cpu["accepted"]:
            take = min(a + 1, MAX_NEW - n)
            cut.append(take - 1)
            n += take
        first = next((r for r, (a, b) in enumerate(zip(engine_acc[j], cut))
                      if a != b), None)
        if first is None and len(engine_acc[j]) != len(cut):
            first = min(len(engine_acc[j]), len(cut))
        row["first_diff_round"] = first
        emitted = 1 + sum(a + 1 for a in cpu["accepted"][:first or 0])
        last = first is not None and (
            first >= len(engine_acc[j]) - 1
            or first >= len(cpu["accepted"]) - 1)
        row["at_last_round"] = bool(last)
        if first is not None and first < len(cpu["rounds"]) and \
                first < len(engine_acc[j]):
            rd = cpu["rounds"][first]
            toks = cpu["tokens"]
            greedy = toks[emitted:emitted + rd["v"].shape[0]]
            a, e = cpu["accepted"][first], engine_acc[j][first]
            row["round"] = dict(cpu_accepts=a, engine_accepts=e,
                                greedy_after_anchor=greedy)
            if len(greedy) > min(a, e):
                row["round"]["margin"] = margin(
                    rd["v"], rd["i"], rd["anchor"], greedy, budget, algo,
                    min(a, e) + 1, e)
            D, K = rd["v"].shape
            with torch.no_grad():
                lc = load_head(head_dir).eval().draft_block(
                    rd["ctx"], rd["anchor"], tgt_cpu.get_input_embeddings(),
                    tgt_cpu.get_output_embeddings(),
                    num_draft=D).float().log_softmax(-1)
            if len(greedy) > min(a, e):
                d = min(a, e) + 1
                row["round"]["width_cut"] = dict(depth=d, **width_cut(
                    lc[d - 1], K, greedy[d - 1]))
            if cuda:
                with torch.no_grad():
                    lg = head_gpu.draft_block(
                        rd["ctx"].cuda(), rd["anchor"],
                        tgt_gpu.get_input_embeddings(),
                        tgt_gpu.get_output_embeddings(),
                        num_draft=D).float().log_softmax(-1)
                gv, gi = lg.cpu().topk(rd["v"].shape[1], dim=-1)
                row["round"]["head_max_abs_diff_gpu_cpu"] = float(
                    (lg.cpu() - lc).abs().max())
                row["round"]["cpu_recomputed_equals_oracle"] = bool(
                    torch.equal(lc.topk(rd["v"].shape[1], dim=-1)[0],
                                rd["v"]))
                if len(greedy) > min(a, e):
                    row["round"]["gpu_head_tree_accepts"] = accepted_len(
                        gv, gi, rd["anchor"], greedy, budget, algo)
                    # ... and with TF32 matmuls (what fp32 attention in
                    # vLLM's backends does on tensor cores)
                    torch.backends.cuda.matmul.allow_tf32 = True
                    with torch.no_grad():
                        lt = head_gpu.draft_block(
                            rd["ctx"].cuda(), rd["anchor"],
                            tgt_gpu.get_input_embeddings(),
                            tgt_gpu.get_output_embeddings(),
                            num_draft=D).float().log_softmax(-1).cpu()
                    torch.backends.cuda.matmul.allow_tf32 = False
                    tv, ti = lt.topk(K, dim=-1)
                    row["round"]["tf32_head"] = dict(
                        max_abs_diff_vs_cpu=float((lt - lc).abs().max()),
                        tree_accepts=accepted_len(tv, ti, rd["anchor"],
                                                  greedy, budget, algo))
        report["prompts"].append(row)
        print(json.dumps({k: v for k, v in row.items()
                          if k not in ("engine", "cpu", "cuda")}),
              flush=True)
    tot = dict(engine=sum(len(a) for a in engine_acc),
               cpu=sum(len(r["accepted"]) for r in runs["cpu"]))
    if cuda:
        tot["cuda"] = sum(len(r["accepted"]) for r in runs["cuda"])
    report["rounds"] = tot
    print("rounds:", json.dumps(tot), flush=True)
    (out / "round_diff.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
