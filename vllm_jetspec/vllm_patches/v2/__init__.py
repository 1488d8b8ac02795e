"""jetspec rounds in vLLM 0.26's V2 model runner (``vllm/v1/worker/gpu/``),
the runner vLLM uses on CUDA, with async scheduling.

Why V2 (docs/design/async-rounds.md): stock AR and stock ``dflash`` run
there on CUDA, with the host preparing step n + 1 while the device runs
step n, their inputs built by device kernels from device state (request
states, draft tokens, ``num_computed_tokens``) and the draft pass one FULL
CUDA graph. A tree round fits that design with a fixed number of draft
slots per request (``budget - 1``, scheduled as placeholders before the
trees exist): the trees are built on the device inside the draft graph
(``speculator``), positions and masks of the verify step come from device
buffers (``verifier.begin_step``), and acceptance with K/V compaction runs
on the device in vLLM's rejection-sampler slot (``verifier.TreeVerifier``).
The host learns the accepted lengths one step late, from the output copy
vLLM makes anyway.

The V1 hooks (``vllm_patches.runner``) stay for vLLM's CPU platform (its
runner is V1 and synchronous) and for ``VLLM_USE_V2_MODEL_RUNNER=0``.
"""

from __future__ import annotations

import os

from vllm.logger import init_logger

from .. import tree_state
from ..config import settings_of
from ..profile import StepProfiler

logger = init_logger("vllm.jetspec.v2")


def _jetspec(runner) -> bool:
    spec = getattr(runner, "speculative_config", None)
    return spec is not None and settings_of(spec) is not None


def _graphs_on(runner) -> bool:
    from vllm.config import CUDAGraphMode
    from ..runner import TREE_GRAPHS_ENV
    mode = os.environ.get(TREE_GRAPHS_ENV, "1")
    return mode == "1" and runner.device.type == "cuda" and \
        not runner.model_config.enforce_eager and \
        runner.compilation_config.cudagraph_mode != CUDAGraphMode.NONE


def wrap_init_speculator(orig):
    def init_speculator(vllm_config, device):
        if settings_of(vllm_config.speculative_config) is None:
            return orig(vllm_config, device)
        from .speculator import JetSpecSpeculator
        return JetSpecSpeculator(vllm_config, device)
    return init_speculator


def wrap_init(orig):
    def __init__(self, vllm_config, device, *args, **kwargs):
        spec = vllm_config.speculative_config
        if spec is not None and settings_of(spec) is not None:
            from ..runner import _select_attention
            _select_attention(vllm_config, device)
        orig(self, vllm_config, device, *args, **kwargs)
        self._jetspec_verifier = None
        # Counts of CUDA-graph modes (and, with JETSPEC_PROFILE=1, steps)
        # for the bench and the tests; no timing: a timed segment would
        # wait for the device and undo the overlap this runner is for.
        self._jetspec_prof = StepProfiler()
        if _jetspec(self):
            if self.speculator is not None:
                self.speculator.profiler = self._jetspec_prof
            s = settings_of(spec)
            logger.info("jetspec: tree budget %d, width %d, %s, depth %d "
                        "(V2 runner: device-side rounds)", s.budget,
                        s.width, s.algo, s.depth)
    return __init__


def _count(modes: dict, key: str) -> None:
    modes[key] = modes.get(key, 0) + 1


# Tokens past max_model_len the block tables being built must cover (set
# while a jetspec runner builds them; see block_tables_with_slack).
_slack_tokens = 0


def block_tables_with_slack(orig):
    """vLLM's V2 runner sizes each request's block-table row for
    ``max_model_len`` tokens, but the DFlash draft pass (stock and ours)
    attends over ``last position + 1 + 1 + depth`` tokens: in a request's
    last rounds that reads up to ``depth + 1`` tokens' worth of columns
    past its row, and past the table's end for the last row (H200,
    2026-12-03: an illegal memory access killed stock ``dflash`` and
    jetspec engines with ``max_num_seqs=1`` as a request reached
    ``max_model_len``). For jetspec engines the rows get that many more
    columns: zeros, i.e. vLLM's null block, whose contents nothing
    reads for a real position. The width stays a multiple of vLLM's
    alignment (128 tokens' worth of blocks, for backends that need it)."""
    def make(*args, **kwargs):
        extra = _slack_tokens
        if extra and "max_num_blocks_per_group" not in kwargs:
            # vLLM 0.26 passes it by name; anything else is another vLLM.
            logger.warning_once(
                "jetspec: BlockTables built without max_num_blocks_per_group"
                " by name: block-table rows not widened for the draft pass "
                "(a request reaching max_model_len may read past its row)")
        elif extra:
            widths = []
            for m, bs in zip(kwargs["max_num_blocks_per_group"],
                             kwargs["block_sizes"]):
                m += -(-extra // bs) + 1
                align = 128 // bs if bs <= 128 else 1
                widths.append(-(-m // align) * align)
            kwargs["max_num_blocks_per_group"] = widths
        return orig(*args, **kwargs)
    make._jetspec_wrapped = True
    return make


def wrap_initialize_kv_cache(orig):
    def initialize_kv_cache(self, kv_cache_config):
        global _slack_tokens
        spec = getattr(self, "speculator", None)
        if _jetspec(self) and spec is not None:
            _slack_tokens = spec.num_query_per_req
        try:
            orig(self, kv_cache_config)
        finally:
            _slack_tokens = 0
        prof = self._jetspec_prof
        for manager, field, name in (
                (self.cudagraph_manager, "graph_modes", None),
                (getattr(self.speculator, "query_cudagraph_manager", None),
                 "draft_modes", "graph")):
            if manager is None:
                continue

            def dispatch(*a, _orig=manager.dispatch, _field=field,
                         _name=name, **k):
                desc = _orig(*a, **k)
                mode = desc.cg_mode.name
                # the profiler's dict of now (a reset replaces it)
                _count(getattr(prof, _field), mode if _name is None else
                       (_name if mode == "FULL" else mode.lower()))
                return desc
            manager.dispatch = dispatch
    return initialize_kv_cache


def wrap_load_model(orig):
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        if _jetspec(self) and self.sampler is not None:
            from .verifier import TreeVerifier
            self._jetspec_verifier = TreeVerifier(self, self.speculator,
                                                  graphs=_graphs_on(self))
            self.rejection_sampler = self._jetspec_verifier
        return out
    return load_model


def wrap_prepare_attn(orig):
    def prepare_attn(self, input_batch):
        block_tables, slot_mappings = orig(self, input_batch)
        if self._jetspec_prof.enabled:
            self._jetspec_prof.steps += 1
        v = getattr(self, "_jetspec_verifier", None)
        if v is not None:
            v.begin_step(input_batch, slot_mappings)
        return block_tables, slot_mappings
    return prepare_attn


def wrap_execute_model(orig):
    """Hands the speculator the step's ``num_spec_tokens_to_schedule``:
    under async scheduling (vLLM's dynamic speculative decoding) the
    number of draft placeholders every request scheduled in this step gets
    for the next step it runs in (a request left out of a step keeps those
    of the last step it ran in, whose draft pass ran for it unless they
    were 0), so the draft pass of a step whose count is 0 can skip the
    head's forward (``JetSpecSpeculator.propose``). The runner's
    ``sample_tokens`` (which proposes) follows each ``execute_model``
    before the next one (``EngineCore.step_with_batch_queue``).

    The step's tree handover (``tree_state.DeviceTrees``, set in
    ``prepare_attn`` for the target's attention metadata) ends with the
    step, whatever happens in it: the verifier clears it when it samples,
    but a forward that raises, or vLLM's ``_dummy_run`` (which proposes
    without sampling), would leave it for the next metadata built -- a
    draft pass's -- to read."""
    def execute_model(self, scheduler_output, *args, **kwargs):
        sp = getattr(self, "speculator", None)
        if sp is not None and hasattr(sp, "next_num_drafts"):
            sp.next_num_drafts = getattr(scheduler_output,
                                         "num_spec_tokens_to_schedule", None)
        try:
            return orig(self, scheduler_output, *args, **kwargs)
        finally:
            tree_state.set_device_trees(None)
    return execute_model


def wrap_add_requests(orig):
    def add_requests(self, scheduler_output):
        orig(self, scheduler_output)
        v = getattr(self, "_jetspec_verifier", None)
        if v is None:
            return
        for new in scheduler_output.scheduled_new_reqs:
            idx = self.req_states.req_id_to_index[new.req_id]
            v.add_request(idx, new.sampling_params,
                          warn=not getattr(self, "_jetspec_in_warmup", False))
            v.speculator.add_request(idx, new.prompt_token_ids)
    return add_requests


def wrap_warmup_kernels(orig):
    """vLLM's start-up warm-up (``gpu/warmup.py``) prefills dummy requests
    whose prompts are the token ids ``0 .. decode_query_len``: with a tree
    budget of 64 that is id 64, past the (padded) vocabulary of a model
    with fewer tokens, and the embedding's device-side assert kills the
    process (H200, 2026-12-03: the engine tests' 32-token model). Those
    ids are folded into the vocabulary before the step runs; real models
    (vocabularies far above any budget) see the same ids as before. The
    warm-up's steps also say that drafts follow (a real scheduler's
    ``num_spec_tokens_to_schedule``; vLLM's warm-up leaves it 0), so its
    draft passes run whole. Its requests carry every sampling feature
    (``SamplingParams.for_sampler_warmup``: penalties among them), which no
    user sent: the verifier does not warn about them, so its once-only
    warning is left for the first user request that needs it."""
    def warmup_kernels(model_runner, execute_model, sample_tokens, *a, **k):
        if not _jetspec(model_runner):
            return orig(model_runner, execute_model, sample_tokens, *a, **k)
        vocab = model_runner.model_config.get_vocab_size()

        def execute(out, *ea, **ek):
            fold_warmup_prompts(out, vocab)
            out.num_spec_tokens_to_schedule = max(
                out.num_spec_tokens_to_schedule,
                model_runner.num_speculative_steps)
            return execute_model(out, *ea, **ek)
        model_runner._jetspec_in_warmup = True
        try:
            return orig(model_runner, execute, sample_tokens, *a, **k)
        finally:
            model_runner._jetspec_in_warmup = False
    warmup_kernels._jetspec_wrapped = True
    return warmup_kernels


def fold_warmup_prompts(scheduler_output, vocab: int) -> None:
    """Token ids of the step's new requests taken modulo ``vocab``."""
    for new in scheduler_output.scheduled_new_reqs:
        for name in ("prompt_token_ids", "prefill_token_ids"):
            ids = getattr(new, name, None)
            if ids and max(ids) >= vocab:
                setattr(new, name, [t % vocab for t in ids])


def apply() -> None:
    """Install the V2 runner patches (idempotent; inert for engines whose
    speculative config is not jetspec)."""
    from vllm.v1.worker import gpu_worker
    from vllm.v1.worker.gpu import model_runner as mr

    from . import auto, precompile
    auto.apply()
    precompile.install()

    if not getattr(gpu_worker.warmup_kernels, "_jetspec_wrapped", False):
        gpu_worker.warmup_kernels = wrap_warmup_kernels(
            gpu_worker.warmup_kernels)

    if not getattr(mr.BlockTables, "_jetspec_wrapped", False):
        mr.BlockTables = block_tables_with_slack(mr.BlockTables)
    R = mr.GPUModelRunner
    if getattr(R, "_jetspec_patched", False):
        return
    mr.init_speculator = wrap_init_speculator(mr.init_speculator)
    R.__init__ = wrap_init(R.__init__)
    R.load_model = wrap_load_model(R.load_model)
    R.initialize_kv_cache = wrap_initialize_kv_cache(R.initialize_kv_cache)
    R.prepare_attn = wrap_prepare_attn(R.prepare_attn)
    R.add_requests = wrap_add_requests(R.add_requests)
    R.execute_model = wrap_execute_model(R.execute_model)
    R._jetspec_patched = True
