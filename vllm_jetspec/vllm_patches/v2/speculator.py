"""The jetspec draft pass as a speculator of vLLM's V2 model runner.

vLLM's ``DFlashSpeculator`` (``vllm/v1/worker/gpu/spec_decode/dflash/``)
already runs the parallel draft head as this runner wants it: the draft
inputs are made on the device from the verify step's outputs (no wait for
the host), the head's forward replays one FULL CUDA graph per batch size,
and the drafts land in a device buffer the next step's input ids are built
from. This subclass changes what happens after the head's forward, inside
that same graph: the per-depth top-K instead of the argmax, one tree per
request under the budget and its packed ancestor mask (one Triton launch,
``kernels/tree_build.py``, equal to ``tree.build_tree`` +
``packed_ancestor_mask``);
the tree's nodes 1.. are the request's draft tokens. So a tree round has
no more host work than a linear one.

Two things around the pass: before it, the verify step's accepted paths
are put first in the target's hidden states and the positions made linear
again (``TreeVerifier`` leaves the gather), so vLLM's input kernel reads
each request's kept sequence as after a chain; after it, each batch row's
tree is stored under its request-state index, where the next verify step
(whose batch order may differ) finds it.

Under ``tree_budget: "auto"`` the scheduler may make the next step plain
(no drafts: vLLM's dynamic speculative decoding, ``v2/auto.py``); it says
so in the step's ``num_spec_tokens_to_schedule``, which the runner hands
over before the step (``next_num_drafts``). Then the draft pass only
stores the step's context K/V in the head's cache (as every step does, so
the head's context has no holes when trees come back) and skips the
head's forward and the trees, which a plain step of a jetspec engine paid
before (``JETSPEC_PLAIN_STEP_DRAFT=run`` keeps them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.config.compilation import CUDAGraphMode
from vllm.logger import init_logger
from vllm.v1.worker.gpu.spec_decode.dflash.speculator import DFlashSpeculator

from ...replay import force_top1, load_replay
from ...tree import build_tree, packed_ancestor_mask
from ...tree.masks import BITS
from ..config import env_choice, settings_of, verify_rows_setting

logger = init_logger("vllm.jetspec.v2")


TREE_BUILD_ENV = "JETSPEC_TREE_BUILD"


PLAIN_STEP_DRAFT_ENV = "JETSPEC_PLAIN_STEP_DRAFT"


def plain_step_draft_setting(env=None) -> str:
    """``JETSPEC_PLAIN_STEP_DRAFT``: what the draft pass of a step does
    when the next step is plain, ``skip`` (default: the head's context K/V
    only) or ``run`` (the whole pass, whose trees nobody verifies)."""
    return env_choice(PLAIN_STEP_DRAFT_ENV, ("skip", "run"), "skip", env)


def tree_build_setting(env=None) -> str:
    """``JETSPEC_TREE_BUILD``: how the draft pass builds its trees,
    ``kernel`` (default: one Triton launch, ``kernels/tree_build.py``) or
    ``torch`` (the tree core's ``build_tree`` + ``packed_ancestor_mask``,
    ≈ 80 small kernels; the same trees)."""
    return env_choice(TREE_BUILD_ENV, ("kernel", "torch"), "kernel", env)


@dataclass
class VerifyStep:
    """What the verify step leaves for the draft pass that follows it."""

    # [M] int64: step token index of every verified row (logits_indices)
    token_index: torch.Tensor
    # [M] int64: what was added to those tokens' positions (depth - local)
    pos_offset: torch.Tensor
    # [T] int64: gather over the step's tokens putting accepted paths first
    reorder: torch.Tensor
    # whether the offsets were added by the verify-rows kernel (then one
    # launch takes them back)
    kernel: bool = False

    def linear_positions(self, positions: torch.Tensor) -> None:
        """Takes the step's tree offsets back out of ``positions`` (the
        runner's buffer): each verified token at ``prefix + local``
        again."""
        if self.kernel:
            from vllm_jetspec.kernels.tree_verify import untree_positions
            untree_positions(positions, self.token_index, self.pos_offset)
        else:
            positions.index_add_(0, self.token_index, -self.pos_offset)


class JetSpecSpeculator(DFlashSpeculator):
    _speculator_name = "JetSpec"

    def __init__(self, vllm_config, device: torch.device):
        spec = vllm_config.speculative_config
        s = settings_of(spec)
        slots = spec.num_speculative_tokens     # budget - 1: scheduled drafts
        # DFlash sizes its draft pass (1 + num_speculative_steps query slots
        # per request, the sampled rows) from num_speculative_tokens; a
        # tree's draft pass has the head's depth instead.
        object.__setattr__(spec, "num_speculative_tokens", s.depth)
        try:
            super().__init__(vllm_config, device)
        finally:
            object.__setattr__(spec, "num_speculative_tokens", slots)
        self.settings = s
        if torch.device(device).type == "cuda":
            # vLLM's draft-input kernel compiles a variant per step length
            # class: all of them at its first launch (v2/precompile.py)
            from .precompile import want_dflash_block_sizes
            want_dflash_block_sizes(self.num_query_per_req)
        # Trees are built from the head's top-K, never from sampled drafts.
        self.draft_logits = None
        R, B = self.max_num_reqs, s.budget
        W = (B + BITS - 1) // BITS
        # [max_num_reqs, budget - 1] int64: nodes 1.. of each batch row's
        # tree, the request's draft tokens (padding nodes: token 0, which
        # no real node attends to)
        self.draft_tokens = torch.zeros(R, slots, dtype=torch.int64,
                                        device=device)
        # The draft pass's trees by batch row (graph outputs) ...
        # (-1: a root's parent, as every tree stores it)
        self.row_parents = torch.full((R, B), -1, dtype=torch.int64,
                                      device=device)
        self.row_depth = torch.zeros(R, B, dtype=torch.int64, device=device)
        self.row_masks = torch.zeros(R, B, W, dtype=torch.int64,
                                     device=device)
        self.row_nodes = torch.ones(R, dtype=torch.int64, device=device)
        # ... and by request-state index, read by the next verify step:
        # [max_num_reqs, budget] parents (-1: root, padding), depths (0 for
        # padding: the root's position), [max_num_reqs, budget, W] packed
        # ancestor rows, [max_num_reqs] real nodes per tree.
        self.req_parents = torch.full((R, B), -1, dtype=torch.int64,
                                      device=device)
        self.req_depth = torch.zeros(R, B, dtype=torch.int64, device=device)
        self.req_masks = torch.zeros(R, B, W, dtype=torch.int64,
                                     device=device)
        self.req_nodes = torch.ones(R, dtype=torch.int64, device=device)
        # [max_num_reqs] the bonus (anchor) slot of each request's query
        self.anchor_index = torch.arange(R, dtype=torch.int64,
                                         device=device) * self.num_query_per_req
        # Replay mode (benchmarks): per request-state index the recorded
        # sequence (prompt + output; -1 past its end), read in the graph.
        self.replay = load_replay(s.replay) if s.replay else None
        self.replay_table = torch.full(
            (R, self.max_model_len + self.num_query_per_req), -1,
            dtype=torch.int64, device=device) if self.replay else None
        self.verify_step: VerifyStep | None = None
        self.tree_kernel = tree_build_setting() == "kernel"
        # the trees' store to their request states in one launch (CUDA;
        # JETSPEC_VERIFY_ROWS, with the verify step's kernels)
        self.store_kernel = verify_rows_setting() == "kernel"
        # tree_budget "auto" (v2/auto.py): the scheduler picks how many of
        # a tree's nodes a step verifies, so trees are laid out best first
        # (every prefix is the tree of that budget).
        self.layout = "best_first" if s.auto else "depth"
        # Draft placeholders the scheduler gives each request of the
        # current step for its next one (the step's
        # num_spec_tokens_to_schedule, set by the runner before each step;
        # None: not known, the pass runs) ...
        self.next_num_drafts: int | None = None
        # ... and whether a draft pass for a plain next step is skipped.
        self.skip_plain = plain_step_draft_setting() == "skip"
        # (only async scheduling gives each request the scheduler's
        # per-step count as placeholders; the synchronous scheduler takes
        # this pass's drafts, all of them)
        self.async_scheduling = bool(getattr(
            vllm_config.scheduler_config, "async_scheduling", False))
        self._skipping = False
        # The runner's StepProfiler (counts skipped passes), set by it.
        self.profiler = None

    def set_attn(self, *args, **kwargs) -> None:
        """vLLM's, then the draft layers' tree-attention builders sized for
        the draft pass's ``1 + depth`` slots a request (a bidirectional
        head's may exceed the budget: ``reserve_nodes``)."""
        super().set_attn(*args, **kwargs)
        from ..triton_attention import TritonTreeAttentionMetadataBuilder
        for groups in self.attn_groups:
            for g in (groups if isinstance(groups, list) else [groups]):
                for b in g.metadata_builders:
                    if isinstance(b, TritonTreeAttentionMetadataBuilder):
                        b.reserve_nodes(self.num_query_per_req)

    def init_cudagraph_manager(self, cudagraph_mode: CUDAGraphMode) -> None:
        """vLLM's graph manager reads a dynamic-SD schedule (``auto``) as
        the verify step's query lengths; the draft pass always runs 1 +
        depth tokens a request, so its manager is planned without it."""
        spec = self.vllm_config.speculative_config
        sched = getattr(spec, "num_speculative_tokens_per_batch_size", None)
        object.__setattr__(spec, "num_speculative_tokens_per_batch_size",
                           None)
        try:
            super().init_cudagraph_manager(cudagraph_mode)
        finally:
            object.__setattr__(spec, "num_speculative_tokens_per_batch_size",
                               sched)

    def capture(self) -> None:
        super().capture()
        if self.query_cudagraph_manager is not None and \
                self.query_cudagraph_manager.needs_capture():
            logger.info("jetspec: draft pass replays a graph per shape "
                        "(CUDA): the head, its top-K and the trees")
        self._warn_if_draft_not_graphed()

    def _warn_if_draft_not_graphed(self) -> None:
        """vLLM's DFlash graph manager captures the draft pass (1 + depth
        tokens a request) only at the capture sizes that round up to a
        multiple of that within ``max_num_seqs`` requests. vLLM's default
        sizes (1, 2, 4, 8, 16, 24, ...) always give some; sizes given for
        the verify step only (e.g. just 128 for one tree of 128) give none,
        and every draft pass then runs outside a FULL graph — 2026-12-03,
        budget 128: ``_run_model`` in the trace, the round host-bound.
        Says so once at start-up (reads the manager's capture plan; if
        vLLM renames it, says nothing)."""
        m = self.query_cudagraph_manager
        descs = getattr(m, "_capture_descs", None)
        if m is None or not getattr(m, "cudagraph_mode", None) or \
                not isinstance(descs, dict):
            return
        q = self.num_query_per_req
        full = [d for d in descs.get(CUDAGraphMode.FULL, [])
                if getattr(d, "uniform_token_count", None) == q]
        if not full:
            logger.warning(
                "jetspec: the draft pass (%d tokens a request) has no FULL "
                "CUDA graph at these cudagraph_capture_sizes (%s) and runs "
                "outside one every round; add multiples of %d up to "
                "max_num_seqs x %d to the sizes (vLLM's default sizes "
                "include them)", q,
                self.vllm_config.compilation_config.cudagraph_capture_sizes,
                q, q)

    # -- requests ---------------------------------------------------------

    def add_request(self, req_index: int, prompt_token_ids) -> None:
        """Replay mode: the recorded sequence of a new request (one copy
        per request, from pinned memory: no wait for the device)."""
        if self.replay is None:
            return
        seq = self.replay.get(tuple(prompt_token_ids or ())) or []
        row = torch.full((self.replay_table.shape[1],), -1, dtype=torch.int64)
        n = min(len(seq), row.shape[0])
        row[:n] = torch.tensor(seq[:n], dtype=torch.int64)
        self.replay_table[req_index].copy_(row.pin_memory(),
                                           non_blocking=True)

    # -- the draft pass ---------------------------------------------------

    def _replay_tokens(self, num_reqs: int) -> torch.Tensor:
        """[num_reqs * depth] the recorded tokens after each request's
        anchor (-1 where none), gathered on the device."""
        D = self.num_speculative_steps
        T = self.replay_table.shape[1]
        anchor_pos = self.input_buffers.positions[
            self.anchor_index[:num_reqs]].long()
        cols = (anchor_pos[:, None] + 1 +
                torch.arange(D, device=anchor_pos.device)).clamp(max=T - 1)
        req = self.idx_mapping[:num_reqs].long().clamp(min=0)
        return self.replay_table.view(-1)[req[:, None] * T + cols].view(-1)

    def _generate_draft(self, num_reqs: int, num_tokens_padded: int,
                        attn_metadata: dict[str, Any] | None,
                        slot_mappings: dict[str, torch.Tensor] | None,
                        num_tokens_across_dp: torch.Tensor | None,
                        cudagraph_runtime_mode: CUDAGraphMode =
                        CUDAGraphMode.NONE) -> None:
        """The head's forward, its per-depth top-K and the trees: captured
        as one graph per batch size by vLLM's DFlash graph manager."""
        if self._skipping:
            return
        s = self.settings
        D = self.num_speculative_steps
        hidden = self._run_model(num_tokens_padded, attn_metadata,
                                 slot_mappings, num_tokens_across_dp,
                                 cudagraph_runtime_mode)
        rows = hidden[self.sample_indices[:num_reqs * D]]
        logits = self.model.compute_logits(rows).float()
        # The top-K of the logits, then their log-probs: a log_softmax
        # over the vocabulary runs one program per row (num_reqs * depth
        # rows: 35 µs a round on an H200 at batch 1), a logsumexp splits
        # each row across the device.
        v, i = logits.topk(min(s.width, logits.shape[-1]), dim=-1)
        v = v - logits.logsumexp(-1, keepdim=True)
        if self.replay is not None:
            v, i = force_top1(v, i, self._replay_tokens(num_reqs))
        K = v.shape[-1]
        if self.tree_kernel:
            # One launch for the trees and their masks, written straight
            # into the row buffers (kernels/tree_build.py; the rows hold
            # nodes 1.., so no anchor). Imported on use, as the other
            # kernels are (Triton reads TRITON_INTERPRET at its first
            # import); under CUDA graphs this body runs only at capture.
            from vllm_jetspec.kernels.tree_build import build_tree_rows
            build_tree_rows(
                v.view(num_reqs, D, K), i.view(num_reqs, D, K), None,
                s.budget, algo=s.algo, layout=self.layout,
                out=(self.draft_tokens[:num_reqs],
                     self.row_parents[:num_reqs], self.row_depth[:num_reqs],
                     self.row_masks[:num_reqs], self.row_nodes[:num_reqs]))
            return
        anchor = self.input_buffers.input_ids[
            self.anchor_index[:num_reqs]].long()
        tree = build_tree(v.view(num_reqs, D, K), i.view(num_reqs, D, K),
                          anchor, s.budget, algo=s.algo, layout=self.layout)
        nodes = tree.tokens[:, 1:]
        self.draft_tokens[:num_reqs] = torch.where(nodes >= 0, nodes, 0)
        self.row_parents[:num_reqs] = tree.parents
        self.row_depth[:num_reqs] = tree.depth.clamp(min=0)
        self.row_masks[:num_reqs] = packed_ancestor_mask(tree)
        self.row_nodes[:num_reqs] = tree.num_nodes

    def _build_draft_attn_metadata(self, *args, **kwargs):
        if self._skipping:
            return None
        return super()._build_draft_attn_metadata(*args, **kwargs)

    def _skips(self, next_num_drafts: int | None, dummy_run: bool) -> bool:
        """Whether this step's draft pass is only the context K/V: the next
        step verifies no drafts (async scheduling: its placeholders are
        the scheduler's count; and no other data-parallel rank waits for
        this rank's draft pass)."""
        return (self.skip_plain and not dummy_run and next_num_drafts == 0
                and self.async_scheduling and self.dp_size == 1)

    @torch.inference_mode()
    def propose(self, input_batch, attn_metadata, slot_mappings,
                last_hidden_states, aux_hidden_states, num_sampled,
                num_rejected, last_sampled, next_prefill_tokens, temperature,
                seeds, num_tokens_across_dp=None, dummy_run: bool = False,
                skip_attn_for_dummy_run: bool = False, mm_inputs=None,
                is_profile: bool = False) -> torch.Tensor:
        step, self.verify_step = self.verify_step, None
        nxt, self.next_num_drafts = self.next_num_drafts, None
        skip = self._skips(nxt, dummy_run)
        if step is not None and not dummy_run:
            # Linear positions again, then each accepted path first: the
            # DFlash input kernel reads a request's first (scheduled -
            # rejected) tokens at their positions as its kept sequence.
            step.linear_positions(input_batch.positions)
            if aux_hidden_states:
                aux_hidden_states = [torch.cat(aux_hidden_states, dim=-1)
                                     .index_select(0, step.reorder)]
            else:
                last_hidden_states = last_hidden_states.index_select(
                    0, step.reorder)
        # Skipping: vLLM's propose still makes the draft inputs and stores
        # the context K/V; eager dispatch (no graph replay), no draft
        # attention metadata, no forward (_generate_draft returns).
        self._skipping = skip
        try:
            out = super().propose(
                input_batch, attn_metadata, slot_mappings,
                last_hidden_states, aux_hidden_states, num_sampled,
                num_rejected, last_sampled, next_prefill_tokens, temperature,
                seeds, num_tokens_across_dp=num_tokens_across_dp,
                dummy_run=dummy_run,
                skip_attn_for_dummy_run=skip_attn_for_dummy_run,
                mm_inputs=mm_inputs, is_profile=is_profile or skip)
        finally:
            self._skipping = False
        if skip:
            # The trees of before stay; a plain step reads no tree.
            if self.profiler is not None:
                modes = self.profiler.draft_modes
                modes["skipped"] = modes.get("skipped", 0) + 1
        elif not dummy_run:
            R = input_batch.num_reqs
            rows = (self.row_parents[:R], self.row_depth[:R],
                    self.row_masks[:R], self.row_nodes[:R])
            states = (self.req_parents, self.req_depth, self.req_masks,
                      self.req_nodes)
            if self.req_nodes.is_cuda and self.store_kernel:
                # one launch for the four copies
                from vllm_jetspec.kernels.tree_verify import store_trees
                store_trees(input_batch.idx_mapping, rows, states)
            else:
                idx = input_batch.idx_mapping.long()
                for src, dst in zip(rows, states):
                    dst.index_copy_(0, idx, src)
        return out
