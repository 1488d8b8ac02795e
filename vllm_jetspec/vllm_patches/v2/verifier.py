"""Tree verification in vLLM's V2 model runner: positions and masks before
the target's forward, acceptance and K/V compaction after it - all on the
device, so the host never waits inside a round.

The scheduler schedules ``budget - 1`` draft slots per request and step
before the trees exist (vLLM's async scheduling, placeholders); the runner
fills them from the drafter's device buffer, a tree's nodes in its node
order (``speculator.JetSpecSpeculator``). Per verify step:

1. ``begin_step`` (after vLLM computed slots from linear positions, before
   the attention metadata): each verified node's position becomes
   ``prefix + depth``; the step's tree masks are the drafter's packed
   ancestor rows gathered by request (``tree_state.set_device_trees``).
2. ``__call__`` (in place of vLLM's ``RejectionSampler``): one target
   token per node from vLLM's own sampler, keyed by the node's position
   (so seeded sampling draws what plain decoding draws at that position),
   then acceptance (``tree.accept``) and each request's kept K/V moved to
   consecutive slots, as one CUDA graph per shape (``graphed.GraphedFn``);
   the output has the rejection sampler's format (accepted path + bonus,
   ``num_sampled``, ``num_rejected``), so vLLM's bookkeeping - device
   ``num_computed_tokens``, the scheduler's rollback one step later, the
   spec-decode metrics - works as for a chain.

On CUDA (``JETSPEC_VERIFY_ROWS=kernel``, the default) the row work of both
halves is Triton launches straight over vLLM's flat rows
(``kernels/tree_verify.py``: one for the positions, one for acceptance, the
path-first order and the K/V move plan, then ``kernels/kv_move.py``)
instead of ≈ 40 small torch kernels through the padded layout; each launch
costs host time, and on a small target the round is the host's
(docs/design/async-rounds.md §4.3). ``torch`` keeps the tree core's path
(and is what runs without CUDA or without one K/V table), and the torch
paths of the draft pass's tree store and the backend's all-tree metadata,
which the same setting switches. The kernels compile in vLLM's start-up
warm-up, whose decode step verifies drafts (``gpu/warmup.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.utils.torch_utils import async_tensor_h2d
from vllm.v1.worker.gpu.input_batch import get_num_sampled_and_rejected
from vllm.v1.worker.gpu.metrics.logits import get_num_nans
from vllm.v1.worker.gpu.sample.logprob import compute_topk_scores
from vllm.v1.worker.gpu.sample.output import SamplerOutput
from vllm.v1.worker.gpu.sample.states import NO_LOGPROBS

from ...graphed import GraphedFn
from ...tree import DraftTree, accept
from ...tree.ragged import (path_first_gather, position_offsets,
                            ragged_rows, to_padded)
from .. import tree_state
from ..compaction import move_kept_kv, path_first_order
from ..config import verify_rows_setting
from ..sampling import root_only_reason
from .speculator import JetSpecSpeculator, VerifyStep

logger = init_logger("vllm.jetspec.v2")


def accept_and_compact(kv_caches, tokens, parents, depth, num_nodes, tgt,
                       slots, *, max_depth: int, table=None):
    """Acceptance of a step's trees and the K/V moves that put each kept
    path at consecutive slots after its prefix, in every layer of
    ``kv_caches`` (our backends' layout ``[blocks, 2, block_size, H, D]``).

    Inputs [R, N] (``num_nodes`` [R]): node tokens, parents, depths, the
    target's token at every node, the K/V slot each node was written to.
    Returns (emitted tokens [R, max_depth + 1] int64, -1 padded; accepted
    drafts [R]; node order [R, N], the kept path by depth first)."""
    R, N = tokens.shape
    acc = accept(DraftTree(tokens, parents, depth,
                           torch.zeros(R, N, device=tokens.device), num_nodes,
                           max_depth=max_depth), tgt)
    move_kept_kv(kv_caches, acc, slots, table)
    return acc.tokens, acc.num_accepted, path_first_order(acc, depth)


class TreeVerifier:
    """vLLM's ``RejectionSampler`` role for jetspec engines on the V2
    runner (``runner.rejection_sampler``)."""

    def __init__(self, runner, speculator: JetSpecSpeculator,
                 graphs: bool) -> None:
        self.runner = runner
        self.sampler = runner.sampler
        self.speculator = speculator
        self.depth = speculator.num_speculative_steps
        self.accept = GraphedFn(self._accept, "acceptance + compaction",
                                enabled=graphs)
        # Per request-state index: keeps its root token only (params the
        # tree sampler cannot honour; root_only_reason); on the device too,
        # for the kernel (written when a request is added, not per step).
        self.root_only = np.zeros(runner.max_num_reqs, dtype=bool)
        self.root_only_dev = torch.zeros(runner.max_num_reqs,
                                         dtype=torch.bool,
                                         device=speculator.req_nodes.device)
        self._kv: list[torch.Tensor] | None = None
        # The same caches as one address table for the Triton move kernel
        # (CUDA, caches alike; else the torch moves)
        self._table = None
        self._group = 0
        # Of the current step, from begin_step
        self._slots: torch.Tensor | None = None
        self._offsets: torch.Tensor | None = None
        # The row work as Triton launches (set with the K/V table: CUDA)
        self._want_kernel = verify_rows_setting() == "kernel"
        self.kernel = False

    def _accept(self, *args, max_depth: int):
        return accept_and_compact(self._target_kv(), *args,
                                  max_depth=max_depth, table=self._table)

    def _target_kv(self) -> list[torch.Tensor]:
        """The K/V caches of the target's layers (the runner's attention
        groups on our tree backend; the head's layers, on it too, are the
        speculator's groups, not the runner's)."""
        if self._kv is None:
            from ..triton_attention import TritonTreeAttentionBackend
            ctx = self.runner.compilation_config.static_forward_context
            self._kv, groups = [], set()
            for gid, group in enumerate(self.runner.attn_groups):
                for g in group:
                    if issubclass(g.backend, TritonTreeAttentionBackend):
                        groups.add(gid)
                        self._kv += [ctx[n].kv_cache for n in g.layer_names]
            if len(groups) != 1:
                raise RuntimeError(f"jetspec: the target's layers span KV "
                                   f"cache groups {sorted(groups)}; one "
                                   "group is supported")
            self._group = groups.pop()
            from ...kernels.kv_move import KVTable
            if self._kv and self._kv[0].is_cuda and \
                    KVTable.supports(self._kv):
                self._table = KVTable(self._kv)
                logger.info("jetspec: kept K/V moved by one kernel for the "
                            "%d target layers", len(self._kv))
            self.kernel = self._want_kernel and self._table is not None
            if self.kernel:
                logger.info("jetspec: verify steps' row work (positions, "
                            "acceptance, path order) in Triton launches")
        return self._kv

    def add_request(self, req_index: int, params, warn: bool = True) -> None:
        """``warn=False``: vLLM's own warm-up requests (every sampling
        feature at once, ``SamplingParams.for_sampler_warmup``), which no
        user sent: no warning, and the once-only warning stays for the
        first user request that needs it."""
        why = root_only_reason(params) if params is not None else None
        self.root_only[req_index] = why is not None
        # every time (one small launch a request, not a step): the device
        # copy never drifts from the host's, whatever happened to its
        # memory (vLLM's sleep mode)
        self.root_only_dev[req_index] = why is not None
        if why and warn:
            logger.warning_once(
                "jetspec: requests with %s keep one token per round (their "
                "root's, sampled as in plain decoding); the other requests "
                "of a batch keep their trees", why)

    # -- before the forward -----------------------------------------------

    def begin_step(self, input_batch, slot_mappings: torch.Tensor) -> None:
        """Tree positions and masks of a verify step (no-op without
        drafts). ``slot_mappings`` [groups, tokens]: vLLM's, from the
        linear positions (each node has its own slot)."""
        self._offsets = None
        if input_batch.num_draft_tokens == 0:
            tree_state.set_device_trees(None)
            return
        sp = self.speculator
        li = input_batch.logits_indices
        self._target_kv()
        if self.kernel:
            from vllm_jetspec.kernels.tree_verify import tree_positions
            off = tree_positions(input_batch.positions, li,
                                 input_batch.expanded_idx_mapping,
                                 input_batch.expanded_local_pos,
                                 sp.req_depth)
        else:
            req = input_batch.expanded_idx_mapping.long()
            local = input_batch.expanded_local_pos.long()
            off = position_offsets(sp.req_depth[req, local], local)
            input_batch.positions.index_add_(0, li, off)
        self._offsets = off
        self._slots = slot_mappings[self._group]
        tree_state.set_device_trees(tree_state.DeviceTrees(
            idx_mapping=input_batch.idx_mapping,
            tree_rows=input_batch.num_draft_tokens_per_req > 0,
            masks=sp.req_masks))

    # -- after the forward ------------------------------------------------

    def __call__(self, logits: torch.Tensor, input_batch,
                 draft_logits: torch.Tensor | None = None) -> SamplerOutput:
        tree_state.set_device_trees(None)
        sampler = self.sampler
        num_nans = get_num_nans(logits) if sampler.compute_nans else None
        li = input_batch.logits_indices
        R = input_batch.num_reqs
        cu = input_batch.cu_num_logits
        N = int(np.diff(input_batch.cu_num_logits_np[:R + 1]).max())
        ids = input_batch.input_ids[li]
        pos = input_batch.positions[li]
        want_lp = sampler.returns_logprobs(input_batch.idx_mapping_np)
        # One target token per node: vLLM's sampler, the node's position
        # as the key of its random draw.
        tgt, processed = sampler.sample(
            logits, input_batch.expanded_idx_mapping,
            input_batch.idx_mapping_np, pos, ids,
            input_batch.expanded_local_pos, return_logprobs=want_lp)
        sp = self.speculator
        if self.kernel:
            from vllm_jetspec.kernels.kv_move import move_kv_slots
            from vllm_jetspec.kernels.tree_verify import accept_rows
            out = accept_rows(
                cu[:R + 1], li, input_batch.input_ids, tgt, self._slots,
                input_batch.idx_mapping, sp.req_parents, sp.req_nodes,
                self.root_only_dev, max_depth=self.depth,
                num_tokens=input_batch.num_tokens, max_rows=N)
            move_kv_slots(self._table, out["src"], out["dst"])
            emitted, num_sampled, perm = (out["emitted"],
                                          out["num_sampled"], out["perm"])
            reorder = out["reorder"]
        else:
            emitted, num_sampled, perm, reorder = self._accept_torch(
                input_batch, ids, tgt, N)
        num_sampled, num_rejected = get_num_sampled_and_rejected(
            num_sampled, input_batch.seq_lens, cu,
            input_batch.idx_mapping, sampler.req_states.prefill_len.gpu)
        if self._offsets is not None:
            sp.verify_step = VerifyStep(token_index=li,
                                        pos_offset=self._offsets,
                                        reorder=reorder, kernel=self.kernel)
        lp = None
        if want_lp:
            lp = self._logprobs(input_batch, logits, processed, emitted,
                                perm, cu)
        return SamplerOutput(sampled_token_ids=emitted,
                             logprobs_tensors=lp, num_nans=num_nans,
                             num_sampled=num_sampled,
                             num_rejected=num_rejected)

    def _accept_torch(self, input_batch, ids, tgt, N):
        """The row work through the tree core's padded layout, acceptance
        and compaction as one CUDA graph per shape: (emitted, accepted + 1
        as int32, node order, the path-first gather over the step's
        tokens)."""
        li = input_batch.logits_indices
        M = li.shape[0]
        R = input_batch.num_reqs
        cu = input_batch.cu_num_logits
        counts = cu[1:R + 1] - cu[:R]
        rows = ragged_rows(counts, M)
        local = input_batch.expanded_local_pos.long()
        sp = self.speculator
        req = input_batch.idx_mapping.long()
        nodes = torch.minimum(counts.long(), sp.req_nodes[req])
        root_only = self.root_only[input_batch.idx_mapping_np]
        if root_only.any():
            # pinned, so the copy does not wait for the stream
            nodes = torch.where(async_tensor_h2d(root_only, nodes.device),
                                1, nodes)
        emitted, num_acc, perm = self.accept(
            to_padded(ids.long(), rows, local, R, N),
            sp.req_parents[req, :N], sp.req_depth[req, :N], nodes,
            to_padded(tgt.long(), rows, local, R, N),
            to_padded(self._slots[li].long(), rows, local, R, N, fill=0),
            max_depth=self.depth)
        # (graph outputs: valid until the next call of this shape)
        return (emitted.clone(), (num_acc + 1).to(torch.int32), perm,
                path_first_gather(li, local, rows, perm,
                                  input_batch.num_tokens))

    def _logprobs(self, input_batch, logits, processed, emitted, perm, cu):
        """Logprobs of the emitted tokens: the rows of each request's kept
        path, in path order (vLLM reads a request's first num_sampled
        rows)."""
        sampler = self.sampler
        if sampler.logprobs_mode in ("processed_logprobs",
                                     "processed_logits"):
            logits = processed
        R = input_batch.num_reqs
        rows = ragged_rows(cu[1:R + 1] - cu[:R], logits.shape[0])
        local = input_batch.expanded_local_pos.long()
        src = cu.long()[rows] + perm[rows, local]
        L = emitted.shape[1]
        tok = torch.where(local < L, emitted[rows, local.clamp(max=L - 1)],
                          -1)
        n = sampler.sampling_states.max_num_logprobs(
            input_batch.idx_mapping_np)
        return compute_topk_scores(
            logits[src], 0 if n == NO_LOGPROBS else n, tok.clamp(min=0),
            input_batch.cu_num_logits_np.tolist(),
            logprob_token_ids_state=sampler.logprob_token_ids_state,
            expanded_idx_mapping=input_batch.expanded_idx_mapping,
            max_per_req_token_ids=sampler.logprob_token_ids_state
            .max_num_token_ids(input_batch.idx_mapping_np),
            logits_mode=sampler.logprobs_mode in ("raw_logits",
                                                  "processed_logits"))
