"""The jetspec draft pass as one CUDA graph per (batch, context, depth).

vLLM 0.26's DFlash proposer (``SpecDecodeBaseProposer.propose``) runs the
head with piecewise CUDA graphs at most (its ``initialize_cudagraph_keys``
allows nothing else): the context K/V projection, every draft layer's
attention, the gather of the sampled rows and the LM head run eagerly,
tens of launches from Python per draft pass (a 3.6-5.2 ms median draft
segment for the Qwen3-8B shape on the H100, 2026-11-24, against a head
whose weights take well under a millisecond to read).

Here, for jetspec engines on CUDA, the single parallel-drafting pass is
split as vLLM's FULL target graphs split a step:

* on the host, every step: vLLM's DFlash input kernel
  (``set_inputs_first_pass``: query ids, positions, slot mappings into the
  proposer's persistent buffers) and the attention metadata, built by our
  Triton tree-attention backend (the drafter's backend on these engines),
  whose builder writes every per-step tensor into buffers it owns;
* in one graph: the hidden-state fusion (``combine_hidden_states``), the
  context K/V projection and cache insert
  (``precompute_and_store_context_kv``), the head's forward, the sampled
  rows, the LM head, log-softmax and per-depth top-K.

A graph replays its capture's kernel arguments, so a step replays one only
if every tensor the graph reads is where it was at capture: the metadata
reports ``graph_safe`` (its builder's own buffers) and the addresses are
part of the graph key (a new address is a new capture, never a stale
read). Only draft passes after a verify step whose requests all had trees of one
size are graphed (at most 64 shapes, ``graphed.MAX_GRAPHS``): the steady
state. The others (a prefill's draft pass, mixed batches), multimodal or
data-parallel engines, non-causal heads and ``JETSPEC_DRAFT_GRAPHS=0`` go
through vLLM's ``propose`` unchanged.
"""

from __future__ import annotations

import os

import torch
from vllm.logger import init_logger

from ..graphed import GraphedFn

logger = init_logger("vllm.jetspec.draft_pass")

DRAFT_GRAPHS_ENV = "JETSPEC_DRAFT_GRAPHS"


def draft_graphs_setting(env=None) -> str:
    """``JETSPEC_DRAFT_GRAPHS``: ``1`` (default: the draft pass as one CUDA
    graph per shape on CUDA engines that capture graphs), ``0`` (vLLM's
    own propose, piecewise graphs), ``host`` (the split pass through
    static buffers on any device with ``graphed.HostGraph``: the CPU
    engine test of the plumbing)."""
    v = (os.environ if env is None else env).get(DRAFT_GRAPHS_ENV,
                                                 "1").strip()
    if v not in ("0", "1", "host"):
        raise ValueError(f"jetspec: {DRAFT_GRAPHS_ENV} must be 0, 1 or "
                         f"host, got {v!r}")
    return v


def draft_graphs_wanted(vllm_config, device, env=None) -> str | None:
    """``cuda``, ``host`` or None (vLLM's propose): CUDA graphs need a CUDA
    engine that captures graphs itself (not ``enforce_eager``, a
    cudagraph mode other than NONE) and one data-parallel rank."""
    mode = draft_graphs_setting(env)
    if mode == "host":
        return "host"
    if mode == "0" or device.type != "cuda":
        return None
    from vllm.config import CUDAGraphMode
    if vllm_config.model_config.enforce_eager or \
            vllm_config.compilation_config.cudagraph_mode == \
            CUDAGraphMode.NONE:
        return None
    if vllm_config.parallel_config.data_parallel_size > 1:
        return None
    return "cuda"


def _body(p, hidden_buf, sample_rows, *, n_ctx, num_query, width, ptrs):
    """The graphed part of a draft pass (``p`` the proposer; every tensor
    it reads lives in ``p``'s, the metadata builder's or ``hidden_buf``'s
    persistent memory, but ``sample_rows``). ``ptrs`` only keys the
    graph."""
    h = p.model.combine_hidden_states(hidden_buf[:n_ctx])
    p.model.precompute_and_store_context_kv(
        h, p._context_positions_buffer[:n_ctx],
        p._context_slot_mapping_buffer[:n_ctx])
    out = p.model(input_ids=p.input_ids[:num_query],
                  positions=p._get_positions(num_query), inputs_embeds=None)
    if p.model_returns_tuple():
        out = out[0]
    logp = p.model.compute_logits(out[sample_rows]).float().log_softmax(-1)
    return logp.topk(min(width, logp.shape[-1]), dim=-1)


class DraftPass:
    """A proposer's split draft pass (see the module docstring)."""

    def __init__(self, proposer, mode: str) -> None:
        self.p = proposer
        self.mode = mode                      # "cuda" or "host"
        # The target's hidden states of a step are copied into one buffer
        # that every graph reads (a graph input would be a copy per
        # graph: up to 64 x 200 MB for the Qwen3-8B shape at batch 32,
        # budget 256); allocated at the first graphed pass, the most
        # tokens a uniform verify step can have.
        self.hidden_buf: torch.Tensor | None = None
        sched = proposer.vllm_config.scheduler_config
        self.max_ctx = min(sched.max_num_batched_tokens,
                           sched.max_num_seqs * proposer.jetspec.budget)
        self.graphs = GraphedFn(
            lambda rows, **s: tuple(_body(proposer, self.hidden_buf, rows,
                                          **s)), "draft pass",
            host_graphs=mode == "host")

    def __call__(self, depth: int, width: int, kwargs: dict):
        """Per-depth top-K ``(log-probs, ids)`` [R * depth, width] of this
        step, or None where vLLM's propose must run instead (nothing has
        been launched then)."""
        p = self.p
        if kwargs.get("mm_embed_inputs") is not None or \
                getattr(p, "eplb_state", None) is not None or \
                getattr(p, "_share_mtp_indices", False) or \
                p.uses_mrope or not p.parallel_drafting:
            return None
        cad = kwargs["common_attn_metadata"]
        R, q = cad.batch_size(), cad.max_query_len
        hidden = kwargs["target_hidden_states"]
        n_ctx = kwargs["target_token_ids"].shape[0]
        if q * R != n_ctx or q > p.jetspec.budget or n_ctx > self.max_ctx:
            # Not a round after verifying R trees of one size (a prefill's
            # draft pass, mixed batches): shapes seen once, not worth a
            # capture each.
            return None
        prof = p.prof
        t = prof.start()
        p.num_speculative_tokens = depth
        p._last_draft_probs = None
        num_query, rows, cad = p.set_inputs_first_pass(
            target_token_ids=kwargs["target_token_ids"],
            next_token_ids=kwargs["next_token_ids"],
            target_positions=kwargs["target_positions"],
            target_hidden_states=hidden,
            token_indices_to_sample=kwargs.get("token_indices_to_sample"),
            cad=cad,
            num_rejected_tokens_gpu=kwargs.get("num_rejected_tokens_gpu"))
        _, per_layer = p.build_per_group_and_layer_attn_metadata(cad)
        mds = list({id(m): m for m in per_layer.values()}.values())
        safe = self.mode == "host" or (
            bool(mds) and all(getattr(m, "graph_safe", False) for m in mds))
        slots = p._get_slot_mapping(num_query, cad.slot_mapping)
        # Profile (JETSPEC_PROFILE=1): the host part, then the graph.
        t = prof.part("draft_inputs", t)
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import set_forward_context
        with set_forward_context(per_layer, p.vllm_config,
                                 num_tokens=num_query,
                                 num_tokens_across_dp=None,
                                 cudagraph_runtime_mode=CUDAGraphMode.NONE,
                                 slot_mapping=slots):
            if self.hidden_buf is None or \
                    self.hidden_buf.shape[1:] != hidden.shape[1:] or \
                    self.hidden_buf.dtype != hidden.dtype:
                self.hidden_buf = hidden.new_empty(
                    (self.max_ctx, *hidden.shape[1:]))
                self.graphs.graphs.clear()    # captured with the old one
            self.hidden_buf[:n_ctx].copy_(hidden)
            if safe:
                v, i = self.graphs(rows, n_ctx=n_ctx, num_query=num_query,
                                   width=width, ptrs=self._ptrs(mds))
            else:
                # The metadata lives in per-step tensors (e.g. a step
                # larger than the builder's buffers): the same work,
                # eagerly.
                logger.debug("jetspec: draft pass eager for %d queries",
                             num_query)
                v, i = _body(p, self.hidden_buf, rows, n_ctx=n_ctx,
                             num_query=num_query, width=width, ptrs=())
        prof.part("draft_body", t)
        return v, i

    def _ptrs(self, mds) -> tuple:
        """Addresses (and strides) of every tensor a replay reads that is
        not a graph input; part of the graph key. Host mode: none (a host
        replay re-runs the body in the current forward context)."""
        if self.mode == "host":
            return ()
        p = self.p
        out = [self.hidden_buf.data_ptr(),
               p.input_ids.data_ptr(), p.positions.data_ptr(),
               p._context_positions_buffer.data_ptr(),
               p._context_slot_mapping_buffer.data_ptr()]
        for m in mds:
            for t in (m.query_start_loc, m.prefix_lens, m.block_table,
                      m.slot_mapping, m.masks, m.tree_rows):
                out += [t.data_ptr(), *t.stride()]
        return tuple(out)
