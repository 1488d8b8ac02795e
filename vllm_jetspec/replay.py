"""Replay mode: a drafter that knows the target's continuation.

For measuring round cost where real acceptance means nothing (dummy
weights), ``python -m vllm_jetspec.tools.bench --replay`` first records the
target's own greedy continuation of every prompt (plain decoding), then
runs jetspec with ``"replay": <file>`` in its speculative config. Each round,
the recorded next ``depth`` tokens become the top-1 candidate at each depth
of the head's top-K (with log-prob 0, so ``accum_logp`` and ``chain`` put the
whole recorded branch in the tree first); the rest of the tree is the head's
own. The target still verifies every token, so output stays the target's
(lossless); τ becomes min(budget, depth + 1) wherever the target reproduces
its recorded tokens (bonus included), which fixes the work per round.

File format (JSON)::

    {"format": "jetspec-replay-v1",
     "sequences": [{"prompt": [ids...], "output": [ids...]}, ...]}

Pure torch; no vLLM import.
"""

from __future__ import annotations

import json
import os

import torch

FORMAT = "jetspec-replay-v1"


def save_replay(path: str, prompts: list[list[int]],
                outputs: list[list[int]]) -> None:
    if len(prompts) != len(outputs):
        raise ValueError("replay: one output per prompt")
    with open(path, "w") as f:
        json.dump(dict(format=FORMAT, sequences=[
            dict(prompt=list(p), output=list(o))
            for p, o in zip(prompts, outputs)]), f)


def load_replay(path: str) -> dict[tuple[int, ...], list[int]]:
    """Prompt token ids -> the whole recorded sequence (prompt + output).
    Raises ``ValueError`` with one clear message on a bad file."""
    if not os.path.isfile(path):
        raise ValueError(f"jetspec: replay file {path!r} does not exist")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"jetspec: replay file {path!r} is not JSON: {e}") \
            from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT \
            or not isinstance(raw.get("sequences"), list):
        raise ValueError(f"jetspec: replay file {path!r} is not in the "
                         f"{FORMAT} format (see vllm_jetspec.replay)")
    table = {}
    for s in raw["sequences"]:
        p, o = s.get("prompt"), s.get("output")
        if not (isinstance(p, list) and isinstance(o, list) and p and all(
                isinstance(x, int) and x >= 0 for x in p + o)):
            raise ValueError(f"jetspec: replay file {path!r}: every "
                             "sequence needs non-empty 'prompt' and an "
                             "'output' of token ids")
        table[tuple(p)] = p + o
    return table


def force_top1(logp: torch.Tensor, ids: torch.Tensor,
               replay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put ``replay`` tokens first in per-depth top-K lists.

    ``logp``/``ids``: [M, K] top-K log-probs (descending) and token ids;
    ``replay``: [M] token per row, -1 to leave the row as it is. A replayed
    token gets log-prob 0 at slot 0; the row's other candidates keep their
    order and values, minus the replayed token if it was among them (no
    duplicate siblings), minus the last one otherwise.
    """
    M, K = ids.shape
    tok = replay.to(ids.device, ids.dtype)
    # Candidates other than the replayed token, in their order, first.
    same = (ids == tok[:, None]).to(torch.int8)
    order = torch.argsort(same, dim=1, stable=True)[:, :K - 1]
    new_ids = torch.cat([tok[:, None], ids.gather(1, order)], dim=1)
    new_logp = torch.cat([logp.new_zeros(M, 1), logp.gather(1, order)],
                         dim=1)
    use = (tok >= 0)[:, None]
    return (torch.where(use, new_logp, logp),
            torch.where(use, new_ids, ids))
