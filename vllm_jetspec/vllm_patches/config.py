"""``"method": "jetspec"`` in ``speculative_config``.

vLLM 0.26 validates ``SpeculativeConfig.method`` against a Literal and
forbids unknown keys, and its DFlash plumbing (head model loading, aux
hidden states of ``target_layer_ids``, the parallel draft pass) is keyed on
``method == "dflash"``. So the jetspec keys are validated and removed here,
before vLLM builds its config, the rest runs as ``dflash``, and the tree
settings ride on the resulting ``SpeculativeConfig`` as the attribute
``jetspec`` (read by the runner patches in every process).

vLLM's ``num_speculative_tokens`` becomes ``tree_budget - 1``: the draft
slots the scheduler reserves per request and step. The head's draft depth
(the user's ``num_speculative_tokens``, default block size - 1; for a causal
head at most ``tree_budget - 1``, the deepest a tree of that budget can be)
is kept in the tree settings.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from ..tree import MAX_BUDGET, TREE_ALGOS

logger = logging.getLogger("vllm.jetspec.config")

JETSPEC_KEYS = ("tree_budget", "tree_width", "tree_algo", "replay",
                "cost_model", "tree_budget_max")
DEFAULT_BUDGET = 64
DEFAULT_WIDTH = 7
DEFAULT_ALGO = "accum_logp"


@dataclass(frozen=True)
class JetSpecSettings:
    budget: int      # nodes per tree, root included
    width: int       # top-K per depth
    algo: str
    depth: int       # draft depth = the head's mask slots used
    # Benchmark mode: a replay file (see ``vllm_jetspec.replay``) whose
    # recorded continuations are put into every tree as its top branch.
    replay: str | None = None
    # tree_budget "auto": the cost-model file; ``budget`` is then the
    # largest budget the policy may pick (vllm_jetspec.autobudget).
    cost_model: str | None = None
    causal: bool = True   # the head's draft layers (then drafting fewer
    #                       slots leaves the first slots' logits unchanged)

    @property
    def auto(self) -> bool:
        return self.cost_model is not None


AUTO_ALGOS = ("accum_logp", "topb_prefix")


def _auto_budget(cost_model, budget_max) -> tuple[int, str]:
    """Validate ``tree_budget: "auto"``; the largest budget and the cost
    model's absolute path."""
    from ..autobudget import BudgetPolicy, CostModel

    if not cost_model:
        raise ValueError("jetspec: tree_budget 'auto' needs 'cost_model', a "
                         "file written by python -m vllm_jetspec.bench "
                         "(cost_model.json) on this device and model")
    cost = CostModel.load(cost_model)
    top = max(cost.budgets)
    budget_max = _int_in("tree_budget_max",
                         top if budget_max is None else budget_max,
                         2, MAX_BUDGET)
    BudgetPolicy(cost, budget_max)        # it must have a candidate
    return budget_max, os.path.abspath(cost_model)


def _int_in(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) \
            or not lo <= value <= hi:
        raise ValueError(f"jetspec: {name} must be an integer in "
                         f"[{lo}, {hi}], got {value!r}")
    return value


def parse(spec: dict, target_hf_config) -> tuple[dict, JetSpecSettings]:
    """Validate a jetspec ``speculative_config`` dict; return the dict vLLM
    builds its (dflash) config from, and the tree settings. Raises
    ``ValueError`` with one clear message on bad input. ``tree_budget`` 1
    (the root alone, no draft token) returns ``None``: plain decoding."""
    from ..head import HeadConfig

    spec = dict(spec)
    spec.pop("method")
    budget = spec.pop("tree_budget", DEFAULT_BUDGET)
    cost_model = spec.pop("cost_model", None)
    budget_max = spec.pop("tree_budget_max", None)
    if budget == "auto":
        budget, cost_model = _auto_budget(cost_model, budget_max)
    else:
        if cost_model is not None or budget_max is not None:
            raise ValueError("jetspec: 'cost_model' and 'tree_budget_max' "
                             "go with tree_budget 'auto'")
        budget = _int_in("tree_budget", budget, 1, MAX_BUDGET)
    width = _int_in("tree_width", spec.pop("tree_width", DEFAULT_WIDTH),
                    1, 64)
    algo = spec.pop("tree_algo", DEFAULT_ALGO)
    if algo not in TREE_ALGOS:
        raise ValueError(f"jetspec: tree_algo must be one of {TREE_ALGOS}, "
                         f"got {algo!r}")
    if cost_model is not None and algo not in AUTO_ALGOS:
        raise ValueError(f"jetspec: tree_budget 'auto' needs tree_algo in "
                         f"{AUTO_ALGOS} (a smaller budget's tree is then the "
                         f"most probable nodes of the larger), got {algo!r}")
    head_dir = spec.get("model")
    if not head_dir:
        raise ValueError("jetspec: 'model' (the head's directory) is "
                         "required")
    cfg_path = os.path.join(head_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"jetspec: no head config at {cfg_path}")
    with open(cfg_path) as f:
        raw = json.load(f)
    if "DFlashDraftModel" not in (raw.get("architectures") or []):
        raise ValueError(f"jetspec: {head_dir} is not a DFlash-format head "
                         f"(architectures {raw.get('architectures')})")
    head = HeadConfig.from_dict(raw)
    head.check_target(target_hf_config)   # one ValueError naming the misfit
    depth = spec.pop("num_speculative_tokens", None)
    depth = head.block_size - 1 if depth is None else depth
    depth = _int_in("num_speculative_tokens (draft depth)", depth, 1,
                    head.block_size - 1)
    if head.causal:
        # A tree of `budget` nodes (root included) is at most budget - 1
        # deep; in a causal head the first slots' logits do not depend on
        # the later ones: drafting fewer slots gives the same trees for
        # less work.
        depth = max(1, min(depth, budget - 1))
    replay = spec.pop("replay", None)
    if replay is not None:
        from ..replay import load_replay
        load_replay(replay)      # one clear error now, not in the worker
        replay = os.path.abspath(replay)
    settings = JetSpecSettings(budget=budget, width=width, algo=algo,
                               depth=depth, replay=replay,
                               cost_model=cost_model, causal=head.causal)
    if budget == 1:
        # The root alone: no draft token to verify, i.e. plain decoding.
        return None, settings
    spec.update(method="dflash", num_speculative_tokens=budget - 1)
    return spec, settings


def settings_of(speculative_config) -> JetSpecSettings | None:
    """The tree settings of an engine's speculative config, if jetspec."""
    return getattr(speculative_config, "jetspec", None)


def patched_max_num_new_slots_for_drafting(orig: property) -> property:
    """Wraps the property ``SpeculativeConfig.max_num_new_slots_for_drafting``.

    ``VllmConfig`` sets the scheduler's token budget per step
    (``max_num_scheduled_tokens``) to ``max_num_batched_tokens`` less this
    many slots per sequence (``max_num_seqs``), kept free for the draft
    pass. For a parallel drafter (dflash) vLLM counts
    ``num_speculative_tokens - 1``, which for jetspec is ``tree_budget - 2``;
    but the jetspec draft pass runs the head's ``depth`` query slots per
    request (``JetSpecProposer.propose``), i.e. what vLLM would reserve for
    dflash at ``num_speculative_tokens = depth``. Counting the budget made
    the scheduler's budget collapse at large trees (tree_budget 256 with 8
    sequences and 2056 batched tokens: 24 tokens a step), so trees were cut
    to their first nodes and prefills crawled."""

    def fget(self):
        n = orig.fget(self)
        s = settings_of(self)
        if s is None or not getattr(self, "parallel_drafting", False):
            return n
        return max(0, n - (self.num_speculative_tokens - s.depth))

    fget._jetspec_wrapped = True
    return property(fget, doc=orig.__doc__)


V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def select_runner(env: dict | None = None, on_cuda: bool | None = None,
                  auto: bool = False) -> str:
    """Which of vLLM's model runners a jetspec engine runs on: ``"v2"`` on
    CUDA (the device-side, asynchronous rounds of ``vllm_patches.v2``;
    vLLM's own default there), ``"v1"`` on vLLM's CPU platform (its only
    runner) or when the user sets ``VLLM_USE_V2_MODEL_RUNNER=0`` (the
    synchronous V1 hooks, ``vllm_patches.runner``), and for ``tree_budget:
    "auto"`` (its per-step budget choice is built on the V1 hooks only).
    Set in this process's environment, which the engine's processes
    inherit."""
    env = os.environ if env is None else env
    if on_cuda is None:
        from vllm.platforms import current_platform
        on_cuda = current_platform.is_cuda()
    v = (env.get(V2_RUNNER_ENV) or "").strip().lower()
    if on_cuda and v not in ("0", "false", "no"):
        if not auto:
            env[V2_RUNNER_ENV] = "1"
            return "v2"
        logger.warning("jetspec: tree_budget 'auto' runs on vLLM's V1 model "
                       "runner (synchronous rounds); a static tree_budget "
                       "runs the V2 runner's asynchronous device-side "
                       "rounds")
    env[V2_RUNNER_ENV] = "0"
    return "v1"


def refuse_async_scheduling(engine_args) -> None:
    """On the V1 runner jetspec rounds are synchronous: vLLM's async path
    there fills the next step's input ids from device-side linear drafts,
    which the V1 tree hooks do not provide. Turn it off (before
    ``SchedulerConfig`` is built from the engine args), or refuse if the
    user asked for it. (The V2 runner's rounds are asynchronous.)"""
    if getattr(engine_args, "async_scheduling", None):
        raise ValueError("jetspec on vLLM's V1 model runner does not "
                         "support async scheduling; drop --async-scheduling "
                         "(async_scheduling=True), or run the V2 runner "
                         "(CUDA, VLLM_USE_V2_MODEL_RUNNER unset)")
    engine_args.async_scheduling = False


EAGER_ENV = "JETSPEC_EAGER"   # "1": a jetspec engine on a GPU runs eagerly


def graphs_on_gpu(engine_args, model_config, on_cpu: bool | None = None,
                  env=None) -> None:
    """CUDA graphs on a GPU: unless ``enforce_eager`` is given, a jetspec
    engine is compiled like any vLLM engine with vLLM's default
    FULL_AND_PIECEWISE graphs: the tree backend reports uniform-batch
    support (``triton_attention.TritonTreeAttentionMetadataBuilder``), so
    a verify step in which every request has exactly budget tokens
    replays one full graph, and every other step (prefill, trees cut by
    the scheduler, plain decoding; ``JETSPEC_FULL_GRAPHS=0``) piecewise
    graphs: projections, MLP, norms and the LM head from graphs per
    token-count bucket, the attention ops between the pieces. The DFlash
    draft pass is piecewise (vLLM's V1 drafter captures nothing else).
    ``JETSPEC_EAGER=1`` forces eager mode (as ``enforce_eager=True``).
    ``model_config`` is built before the speculative config, so both are
    set."""
    env = os.environ if env is None else env
    if on_cpu is None:
        from vllm.platforms import current_platform
        on_cpu = current_platform.is_cpu()
    if on_cpu or getattr(model_config, "enforce_eager", False):
        return
    if env.get(EAGER_ENV, "0") == "1":
        logger.info("jetspec: %s=1, running eagerly (enforce_eager=True)",
                    EAGER_ENV)
        engine_args.enforce_eager = True
        model_config.enforce_eager = True
        return
    logger.info("jetspec: torch.compile and CUDA graphs (full graphs for "
                "verify steps of whole trees, piecewise otherwise); %s=1 or "
                "enforce_eager=True to run eagerly", EAGER_ENV)


def refuse_cpu_expert_parallel(parallel_config,
                               on_cpu: bool | None = None) -> None:
    """vLLM 0.26's CPU fused MoE ignores the expert map (it indexes a rank's
    local experts by global expert id), so ``enable_expert_parallel`` on CPU
    fails while profiling, with or without speculation; say so at start-up.
    Tensor parallelism of MoE targets works on CPU. ``on_cpu``: the
    platform (default: vLLM's current platform)."""
    if not getattr(parallel_config, "enable_expert_parallel", False):
        return
    if on_cpu is None:
        from vllm.platforms import current_platform
        on_cpu = current_platform.is_cpu()
    if on_cpu:
        raise ValueError(
            "jetspec: enable_expert_parallel is not supported by vLLM 0.26 "
            "on CPU (its CPU fused MoE ignores the expert map and fails "
            "without speculation too); use tensor parallelism alone")


def patched_create_speculative_config(orig):
    """Wraps ``EngineArgs.create_speculative_config``."""

    def create_speculative_config(self, target_model_config,
                                  target_parallel_config):
        spec = self.speculative_config
        if not (isinstance(spec, dict) and spec.get("method") == "jetspec"):
            return orig(self, target_model_config, target_parallel_config)
        self.speculative_config, settings = parse(
            spec, target_model_config.hf_config)
        runner = select_runner(auto=settings.auto)
        refuse_cpu_expert_parallel(target_parallel_config)
        if runner == "v1":
            refuse_async_scheduling(self)
        graphs_on_gpu(self, target_model_config)
        if self.speculative_config is None:
            logger.info("jetspec: tree_budget 1 is the root alone (no draft "
                        "token): decoding without speculation")
            return None
        cfg = orig(self, target_model_config, target_parallel_config)
        # A plain attribute: pickled with the config into every process.
        object.__setattr__(cfg, "jetspec", settings)
        return cfg

    create_speculative_config._jetspec_wrapped = True
    return create_speculative_config
