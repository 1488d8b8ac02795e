"""Reference JetSpec decoder: a transformers target, our DFlash head and the
tree core, batch 1. Slow and simple on purpose: it is the correctness
oracle the vLLM path is tested against, and it measures tau.

One round, with the target's KV cache holding every verified token before
the anchor (position ``p``):

1. draft: the head reads the fused target features of all verified tokens
   and the anchor block, and gives per-depth logits [D, V];
2. tree: per-depth top-K -> ``build_tree`` under the node budget;
3. verify: ONE target forward over the tree nodes, positions
   ``p + depth``, attention = the cached prefix plus the node's ancestors
   (``ancestor_mask``);
4. accept: one target token per node (argmax, or a draw with vLLM's
   sampling semantics) -> ``accept``;
5. compact: ``compaction_plan`` moves the kept nodes' K/V to ``p .. p + a``
   in the cache, the rest is cropped; the kept nodes' target features join
   the draft context; the bonus token is the next anchor.

tau = tokens emitted per verify forward, bonus token included, counted
before max_tokens / EOS truncation (it measures the drafter); the prefill
forward, which emits the first token, is not a round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .head import DFlashHead, capture_target_features
from .tree import (accept, ancestor_mask, build_tree, compaction_plan,
                   sample_target_tokens)


@dataclass
class SamplingConfig:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class TreeConfig:
    budget: int = 64
    algo: str = "accum_logp"
    width: int = 7
    depth: int | None = None  # default: head block_size - 1


@dataclass
class ReferenceResult:
    token_ids: list[int]
    # Per verify round: draft tokens accepted (emitted = accepted + 1).
    accepted: list[int] = field(default_factory=list)

    @property
    def num_rounds(self) -> int:
        return len(self.accepted)

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verify forward (bonus included)."""
        if not self.accepted:
            return float("nan")
        return sum(a + 1 for a in self.accepted) / len(self.accepted)


class ReferenceDecoder:
    """Batch-1 JetSpec decoding with a transformers target."""

    def __init__(self, target: torch.nn.Module, head: DFlashHead,
                 tree: TreeConfig | None = None):
        self.target = target.eval()
        self.head = head.eval()
        self.tree = tree or TreeConfig()
        cfg = head.config
        self.depth = self.tree.depth or cfg.block_size - 1
        if not 1 <= self.depth <= cfg.block_size - 1:
            raise ValueError(f"depth must be in [1, {cfg.block_size - 1}]")
        cfg.check_target(target.config)
        self.embed = target.get_input_embeddings()
        self.lm_head = target.get_output_embeddings()

    # ------------------------------------------------------------ pieces
    def _pick(self, logits: torch.Tensor, s: SamplingConfig,
              gen: torch.Generator | None) -> torch.Tensor:
        """Target tokens for logits [N, V] with vLLM's sampling semantics."""
        n = logits.shape[0]
        temp = torch.tensor([s.temperature], device=logits.device)
        kk = None if s.top_k is None else torch.tensor([s.top_k])
        pp = None if s.top_p is None else torch.tensor([s.top_p])
        gens = {0: gen} if gen is not None else None
        return sample_target_tokens(logits[None].float(), temp, kk, pp,
                                    gens)[0].view(n)

    @staticmethod
    def _compact_cache(cache, p: int, src: torch.Tensor, dst: torch.Tensor,
                       keep: int) -> None:
        """Apply a compaction plan to a transformers DynamicCache: move
        slots p+src -> p+dst, then drop everything past p+keep."""
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)                 # [B, H, T, hd]
                if src.numel():
                    t[:, :, p + dst] = t[:, :, p + src]
                setattr(layer, name, t[:, :, :p + keep])

    # ------------------------------------------------------------ decode
    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int,
                 sampling: SamplingConfig | None = None,
                 eos_token_id: int | None = None) -> ReferenceResult:
        from transformers import DynamicCache

        s = sampling or SamplingConfig()
        dev = next(self.target.parameters()).device
        gen = None
        if s.seed is not None:
            gen = torch.Generator(device=dev).manual_seed(s.seed)
        with capture_target_features(
                self.target, self.head.config.target_layer_ids) as take:
            cache = DynamicCache(config=self.target.config)
            ids = torch.tensor([prompt_ids], device=dev)
            out = self.target(input_ids=ids, past_key_values=cache,
                              use_cache=True)
            ctx = take()[0]                                     # [T, F]
            anchor = int(self._pick(out.logits[0, -1:], s, gen)[0])
            result = ReferenceResult([anchor])
            p = len(prompt_ids)
            while (len(result.token_ids) < max_new_tokens
                   and anchor != eos_token_id):
                emitted, kept_feats = self._round(ctx, anchor, p, cache, s,
                                                  gen, take, result)
                ctx = torch.cat([ctx, kept_feats])
                p += len(emitted)
                anchor = emitted[-1]
                for t in emitted:
                    if len(result.token_ids) >= max_new_tokens:
                        break
                    result.token_ids.append(t)
                    if t == eos_token_id:
                        return result
            return result

    def _round(self, ctx, anchor, p, cache, s, gen, take, result):
        dev = ctx.device
        tc = self.tree
        logits = self.head.draft_block(ctx, anchor, self.embed, self.lm_head,
                                       num_draft=self.depth)    # [D, V]
        logp = logits.float().log_softmax(-1)
        width = min(tc.width, logp.shape[-1])
        v, i = logp.topk(width, dim=-1)
        tree = build_tree(v[None], i[None], torch.tensor([anchor], device=dev),
                          tc.budget, algo=tc.algo)
        n = int(tree.num_nodes[0])
        tokens = tree.tokens[0, :n]
        pos = p + tree.depth[0, :n]
        allowed = torch.ones(n, p + n, dtype=torch.bool, device=dev)
        allowed[:, p:] = ancestor_mask(tree)[0, :n, :n]
        dtype = next(self.target.parameters()).dtype
        mask = torch.zeros(1, 1, n, p + n, dtype=dtype, device=dev)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        out = self.target(input_ids=tokens[None], position_ids=pos[None],
                          attention_mask=mask, past_key_values=cache,
                          use_cache=True)
        node_feats = take()[0]                                  # [n, F]
        tgt = torch.full(tree.tokens.shape, -1, dtype=torch.long, device=dev)
        tgt[0, :n] = self._pick(out.logits[0], s, gen)
        acc = accept(tree, tgt)
        a = int(acc.num_accepted[0])
        plan = compaction_plan(acc)
        moving = plan.src[0] >= 0
        self._compact_cache(cache, p, plan.src[0][moving],
                            plan.dst[0][moving], a + 1)
        result.accepted.append(a)
        kept = acc.path_nodes[0, :a + 1]
        return acc.tokens[0, :a + 1].tolist(), node_feats[kept]


@torch.no_grad()
def target_greedy(target: torch.nn.Module, prompt_ids: list[int],
                  max_new_tokens: int, eos_token_id: int | None = None
                  ) -> list[int]:
    """The target's own greedy decoding, one token per forward (the oracle
    for the reference decoder)."""
    from transformers import DynamicCache

    dev = next(target.parameters()).device
    cache = DynamicCache(config=target.config)
    ids = torch.tensor([prompt_ids], device=dev)
    out_ids: list[int] = []
    while len(out_ids) < max_new_tokens:
        logits = target(input_ids=ids, past_key_values=cache,
                        use_cache=True).logits[0, -1]
        t = int(logits.argmax())
        out_ids.append(t)
        if t == eos_token_id:
            break
        ids = torch.tensor([[t]], device=dev)
    return out_ids
