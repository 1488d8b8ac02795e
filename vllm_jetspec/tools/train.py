"""Train a JetSpec (causal DFlash-format) head by distilling the target.

Two steps:

    # 1. the target's own responses to training prompts, generated with vLLM
    python -m vllm_jetspec.tools.train data --prompts sharegpt --num-prompts 8000 \\
        --max-new-tokens 512 --out data.jsonl
    # 2. forward-KL distillation of the target's next-token distributions
    python -m vllm_jetspec.tools.train fit --data data.jsonl --out ckpt/ \\
        --layers 3 --target-layer-ids 1 7 14 20 27 --steps 4000

Objective. For a training sequence (prompt + the target's response) and an
anchor position ``a`` inside the response, the head sees the target's fused
features of tokens ``< a`` and the block ``[x_a, mask, ..., mask]``; slot
``k`` is trained towards the target's own distribution of token ``a + k``
given the true prefix, ``p_k = softmax(target_logits[a + k - 1])``, with the
forward KL ``KL(p_k || q_k)`` (soft labels, not the sampled token). No loss
on the anchor slot. Several random anchors per sequence share one target
forward (blocks are independent: each sees only context before its anchor
and itself, causally).

Depth weighting. ``w_k = gamma ** (k - 1)`` (default gamma 0.8), normalised.
A draft token at depth k is only useful if depths 1..k-1 are accepted too,
so expected acceptance length is dominated by the first depths; a geometric
decay spends capacity where it pays, while keeping every depth trained (the
deep slots still matter inside a tree, where a wide early level lets deeper
branches survive). gamma=1 gives uniform weights.

Checkpoints (``save_head`` format + ``trainer.pt`` with optimizer, step and
RNG state) every ``--save-every`` steps; ``--resume`` continues from the
newest one with identical data order. Fixed seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger("vllm.jetspec.train")


# ----------------------------------------------------------------- data ---

def generate_data(target: str, prompts: list[str], out: str,
                  max_new_tokens: int, temperature: float = 0.0,
                  seed: int = 0, max_model_len: int = 2048,
                  time_limit_s: float | None = None, chunk: int = 2048,
                  n: int = 1, **llm_kwargs) -> int:
    """The target's responses to chat prompts, generated with vLLM, written
    as JSONL rows ``{"prompt_ids": [...], "response_ids": [...]}``.

    Prompts go to the engine in chunks of ``chunk``; each chunk is written
    as soon as it is done, and no new chunk starts once ``time_limit_s``
    seconds have passed (for machines that allow only short jobs). ``n``
    responses per prompt (use a temperature > 0: more distinct sequences
    from the same prompts)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from .eval_tau import encode_prompts

    tok = AutoTokenizer.from_pretrained(target)
    ids = [enc for enc in encode_prompts([{"prompt": p} for p in prompts],
                                         tok, chat=True)
           if len(enc) + 8 <= max_model_len - max_new_tokens]
    t0 = time.perf_counter()
    llm = LLM(target, max_model_len=max_model_len, seed=seed, **llm_kwargs)
    sp = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                        seed=seed, detokenize=False, n=n)
    written = 0
    with open(out, "w") as f:
        for i in range(0, len(ids), chunk):
            if (time_limit_s is not None
                    and time.perf_counter() - t0 > time_limit_s):
                logger.warning("time limit: stopped after %d of %d prompts",
                               i, len(ids))
                break
            part = ids[i:i + chunk]
            outs = llm.generate(
                [TokensPrompt(prompt_token_ids=x) for x in part], sp)
            for x, o in zip(part, outs):
                for c in o.outputs:
                    resp = list(c.token_ids)
                    if len(resp) >= 2:
                        f.write(json.dumps(dict(prompt_ids=x,
                                                response_ids=resp)) + "\n")
                        written += 1
            f.flush()
    return written


def load_data(path: str | list[str],
              max_len: int) -> list[tuple[list[int], int]]:
    """(token ids, index of the first response token), truncated; from one
    JSONL file or several (concatenated in order)."""
    rows = []
    for one in [path] if isinstance(path, (str, os.PathLike)) else path:
        with open(one) as f:
            for line in f:
                r = json.loads(line)
                ids = (r["prompt_ids"] + r["response_ids"])[:max_len]
                start = len(r["prompt_ids"])
                if len(ids) - start >= 2:
                    rows.append((ids, start))
    if not rows:
        raise ValueError(f"{path}: no usable training sequences")
    return rows


# ---------------------------------------------------------------- model ---

@dataclass
class FitConfig:
    layers: int = 3
    target_layer_ids: tuple[int, ...] = (1, 7, 14, 20, 27)
    block_size: int = 16
    mask_token_id: int | None = None
    steps: int = 2000
    batch_size: int = 8
    anchors_per_seq: int = 16
    max_len: int = 1024
    lr: float = 6e-4
    warmup: int = 100
    weight_decay: float = 0.01
    gamma: float = 0.8
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 500
    log_every: int = 20
    # bf16 autocast for the target and the head's matmuls (None: on CUDA
    # only). CPUs with AMX run bf16 several times faster than fp32.
    bf16: bool | None = None


def make_batch(rows, idx, A, bs, pad_id, gen: torch.Generator, device):
    """Pad a batch and draw A anchors per sequence inside the response.

    Returns input_ids [B, T], valid [B, T], anchors [B, A], anchor_ok [B, A].
    An anchor at ``a`` needs ``a + 1`` to exist and to be a response token,
    so anchors are drawn from ``[start - 1, len - 2]``."""
    seqs = [rows[i] for i in idx]
    T = max(len(s) for s, _ in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    anchors = torch.zeros(B, A, dtype=torch.long)
    ok = torch.zeros(B, A, dtype=torch.bool)
    for b, (s, start) in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        valid[b, :len(s)] = True
        lo, hi = max(start - 1, 0), len(s) - 2
        n = hi - lo + 1
        take = min(A, n)
        pick = torch.randperm(n, generator=gen)[:take] + lo
        anchors[b, :take] = pick
        ok[b, :take] = True
    return (ids.to(device), valid.to(device), anchors.to(device),
            ok.to(device))


def depth_weights(bs: int, gamma: float, device) -> torch.Tensor:
    w = gamma ** torch.arange(bs - 1, dtype=torch.float32, device=device)
    return w / w.sum()


def distill_loss(head, target, take, ids, valid, anchors, ok, weights,
                 bs: int):
    """Forward KL per depth. Returns (loss, per-depth top-1 agreement [bs-1],
    per-depth KL [bs-1])."""
    with torch.no_grad():
        out = target.model(input_ids=ids, attention_mask=valid.long())
        final = out.last_hidden_state                     # [B, T, H]
        hid = take()                                       # [B, T, F]
    lm = target.get_output_embeddings()
    emb = target.get_input_embeddings()
    h = head(hid, ids, anchors, emb, context_valid=valid)  # [B, A, bs, H]
    q_logits = lm(h[:, :, 1:].to(lm.weight.dtype)).float()  # [B, A, bs-1, V]
    B, T = ids.shape
    k = torch.arange(1, bs, device=ids.device)
    lab_pos = anchors[..., None] + k                         # [B, A, bs-1]
    in_seq = (lab_pos < T) & ok[..., None]
    lab_pos_c = lab_pos.clamp(max=T - 1)
    in_seq &= valid.gather(1, lab_pos_c.view(B, -1)).view(lab_pos.shape)
    with torch.no_grad():
        src = final.gather(1, (lab_pos_c - 1).view(B, -1, 1).expand(
            -1, -1, final.shape[-1]))
        p_logits = lm(src).float().view(*lab_pos.shape, -1)
        p = p_logits.softmax(-1)
        logp = p_logits.log_softmax(-1)
    logq = q_logits.log_softmax(-1)
    kl = (p * (logp - logq)).sum(-1)                         # [B, A, bs-1]
    m = in_seq.float()
    per_depth_n = m.sum((0, 1)).clamp(min=1)
    per_depth_kl = (kl * m).sum((0, 1)) / per_depth_n
    loss = (per_depth_kl * weights).sum()
    with torch.no_grad():
        agree = ((q_logits.argmax(-1) == p_logits.argmax(-1)).float() * m
                 ).sum((0, 1)) / per_depth_n
    return loss, agree.detach(), per_depth_kl.detach()


def _arch(cfg) -> dict:
    """The fields of a HeadConfig that fix its weights' meaning."""
    return {k: v for k, v in asdict(cfg).items()
            if k not in ("extra", "max_position_embeddings",
                         "num_target_layers")}


def fit(target_dir: str, data: str, out: str, cfg: FitConfig,
        device: str | None = None, resume: bool = False,
        progress: bool = True, stop_at: int | None = None,
        time_limit_s: float | None = None,
        init_from: str | None = None) -> dict:
    """Train a head; returns a summary dict (also written to out/train.json).

    ``stop_at`` / ``time_limit_s`` end this run early (after a checkpoint)
    at a step or after a wall-clock budget, for machines that allow only
    short jobs; ``resume=True`` continues with the same schedule and data.
    ``init_from``: a head directory whose weights start the run (a warm
    start on new data; its architecture must be the one ``cfg`` asks for),
    instead of a random initialisation; a resumed run ignores it.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from ..head import (DFlashHead, HeadConfig, capture_target_features,
                       save_head)
    from ..head.io import load_head

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = device.startswith("cuda") if cfg.bf16 is None else cfg.bf16
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)

    target = AutoModelForCausalLM.from_pretrained(
        target_dir, dtype=torch.bfloat16 if use_bf16 else torch.float32)
    target = target.to(device).eval().requires_grad_(False)
    hc = HeadConfig.for_target(target.config, num_layers=cfg.layers,
                               target_layer_ids=list(cfg.target_layer_ids),
                               block_size=cfg.block_size,
                               mask_token_id=cfg.mask_token_id)
    head = DFlashHead(hc).init_random(cfg.seed, norm_noise=0.0)
    if init_from is not None and not (resume and (outp / "trainer.pt")
                                      .exists()):
        init = load_head(init_from, device="cpu", dtype=torch.float32)
        mine, theirs = _arch(hc), _arch(init.config)
        if mine != theirs:
            diff = {k: (theirs[k], mine[k]) for k in mine
                    if mine[k] != theirs[k]}
            raise ValueError(
                f"--init {init_from}: that head's architecture differs from "
                f"the one asked for (theirs, asked): {diff}")
        head.load_state_dict(init.state_dict())
        logger.info("initialised from %s", init_from)
    head = head.to(device).float().train()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr,
                            weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        1.0, (s + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(
            math.pi * min(s, cfg.steps) / cfg.steps)))
    step = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    # The data order: a fresh permutation per epoch drawn from `gen`; the
    # unconsumed rest is checkpointed so a resumed run sees the same batches.
    order: list[int] = []
    ckpt = outp / "trainer.pt"
    if resume and ckpt.exists():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        head.load_state_dict(load_head(outp, device=device,
                                       dtype=torch.float32).state_dict())
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        order = st["order"]
        step = st["step"]
        logger.info("resumed from step %d", step)

    rows = load_data(data, cfg.max_len)
    pad = target.config.pad_token_id
    pad = 0 if pad is None else int(pad)
    weights = depth_weights(cfg.block_size, cfg.gamma, device)
    history = []
    tokens_seen = 0
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="train",
               disable=not progress)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)

    last: dict | None = None

    def log(rec: dict) -> None:
        history.append(rec)
        with open(outp / "history.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def checkpoint() -> None:
        save_head(head, hc, outp)
        torch.save(dict(opt=opt.state_dict(), sched=sched.state_dict(),
                        gen=gen.get_state(), order=order, step=step), ckpt)

    with capture_target_features(target, list(cfg.target_layer_ids)) as take:
        while step < end:
            if (time_limit_s is not None
                    and time.perf_counter() - t0 > time_limit_s):
                break
            if len(order) < cfg.batch_size:
                order += torch.randperm(len(rows), generator=gen).tolist()
            idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
            ids, valid, anchors, ok = make_batch(
                rows, idx, cfg.anchors_per_seq, cfg.block_size, pad, gen,
                device)
            with torch.autocast(device_type=dev_type, dtype=torch.bfloat16,
                                enabled=use_bf16):
                loss, agree, kl = distill_loss(head, target, take, ids, valid,
                                               anchors, ok, weights,
                                               cfg.block_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            tokens_seen += int(valid.sum())
            last = dict(step=step, loss=loss.item(),
                        lr=sched.get_last_lr()[0],
                        agree=[round(float(a), 4) for a in agree],
                        kl=[round(float(x), 4) for x in kl],
                        tokens_seen=tokens_seen,
                        seconds=round(time.perf_counter() - t0, 1))
            if step % cfg.log_every == 0 or step == end:
                log(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}",
                                agree1=f"{last['agree'][0]:.2f}")
            if step % cfg.save_every == 0 or step == end:
                checkpoint()
            bar.update(1)
    bar.close()
    if step < end:  # stopped by the time limit: log and checkpoint here
        if last is not None and (not history or history[-1] is not last):
            log(last)
        checkpoint()
    summary = dict(config=asdict(cfg), steps=step, done=step >= cfg.steps,
                   data=([os.fspath(x) for x in data]
                         if isinstance(data, (list, tuple))
                         else os.fspath(data)),
                   init_from=init_from,
                   sequences=len(rows), tokens_seen_this_run=tokens_seen,
                   final=history[-1] if history else None)
    (outp / "train.json").write_text(json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------ cli ---

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m vllm_jetspec.tools.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="generate the target's responses (vLLM)")
    d.add_argument("--prompts", default="sharegpt",
                   help="prompt set name or JSONL with a 'prompt' field")
    d.add_argument("--target", default=None)
    d.add_argument("--num-prompts", type=int, default=None)
    d.add_argument("--max-new-tokens", type=int, default=512)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--max-model-len", type=int, default=2048)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--time-limit", type=float, default=None,
                   help="start no new chunk of prompts after this many "
                   "seconds (what is done is kept)")
    d.add_argument("--chunk", type=int, default=2048,
                   help="prompts per engine call; each is written when done")
    d.add_argument("--n", type=int, default=1,
                   help="responses per prompt (with --temperature > 0)")
    d.add_argument("--max-num-seqs", type=int, default=None,
                   help="vLLM's max_num_seqs (larger batches for small "
                   "targets on a GPU)")
    d.add_argument("--out", required=True)
    f = sub.add_parser("fit", help="distil a head from the target")
    f.add_argument("--data", required=True, nargs="+",
                   help="JSONL file(s) from 'train data'")
    f.add_argument("--target", default=None)
    f.add_argument("--out", required=True)
    f.add_argument("--device", default=None)
    f.add_argument("--resume", action="store_true")
    f.add_argument("--init", default=None, metavar="HEAD_DIR",
                   help="start from this head's weights (same architecture)"
                   " instead of a random initialisation")
    f.add_argument("--stop-at", type=int, default=None,
                   help="end this run at this step (resume later)")
    f.add_argument("--time-limit", type=float, default=None,
                   help="end this run after this many seconds (resume later)")
    for name, val in asdict(FitConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(val, tuple):
            f.add_argument(flag, nargs="+", type=int, default=list(val))
        elif name == "bf16":
            f.add_argument(flag, action=argparse.BooleanOptionalAction,
                           default=None)
        elif val is None:
            f.add_argument(flag, type=int, default=None)
        else:
            f.add_argument(flag, type=type(val), default=val)
    args = ap.parse_args(argv)

    from . import assets

    target = args.target or str(assets.default_model_dir())
    if args.cmd == "data":
        rows = assets.load_prompts(args.prompts, limit=args.num_prompts)
        if args.n > 1 and args.temperature == 0:
            ap.error("--n > 1 needs --temperature > 0 (greedy responses "
                     "to one prompt are identical)")
        kw = {}
        if not torch.cuda.is_available():
            kw = dict(gpu_memory_utilization=0.3, dtype="float32")
        if args.max_num_seqs:
            kw["max_num_seqs"] = args.max_num_seqs
        n = generate_data(target, [r["prompt"] for r in rows], args.out,
                          args.max_new_tokens, args.temperature, args.seed,
                          args.max_model_len, args.time_limit, args.chunk,
                          args.n, **kw)
        print(f"wrote {n} sequences to {args.out}")
        return
    cfg = FitConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                       for k, v in vars(args).items()
                       if k in FitConfig.__dataclass_fields__})
    s = fit(target, args.data, args.out, cfg, device=args.device,
            resume=args.resume, stop_at=args.stop_at,
            time_limit_s=args.time_limit, init_from=args.init)
    print(json.dumps(s["final"], indent=1))


if __name__ == "__main__":
    main()
