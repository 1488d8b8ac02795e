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
from dataclasses import dataclass, field

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
    # tree_budget "auto" without a cost model: the policy measures while
    # serving (autobudget.OnlineBudgetPolicy; OnlineRoundPolicy on V1).
    auto_online: bool = False
    causal: bool = True   # the head's draft layers (then drafting fewer
    #                       slots leaves the first slots' logits unchanged)
    # The head's dflash_config as handed to vLLM, and how it was read
    # (``head_summary``); empty for settings made by hand.
    head: dict = field(default_factory=dict, compare=False)

    @property
    def auto(self) -> bool:
        return self.cost_model is not None or self.auto_online

    @property
    def online_budgets(self) -> list[int]:
        """The budgets ``auto`` without a cost model chooses among
        (``autobudget.online_budgets`` up to ``budget``)."""
        from ..autobudget import online_budgets
        return online_budgets(self.budget)


AUTO_ALGOS = ("accum_logp", "topb_prefix")


def _auto_budget(cost_model, budget_max) -> tuple[int, str | None]:
    """Validate ``tree_budget: "auto"``; the largest budget and the cost
    model's absolute path (None: no file, the policy measures while
    serving)."""
    from ..autobudget import ONLINE_BUDGETS, BudgetPolicy, CostModel

    if cost_model is None:
        budget_max = _int_in("tree_budget_max",
                             max(ONLINE_BUDGETS) if budget_max is None
                             else budget_max, 2, MAX_BUDGET)
        return budget_max, None
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


def _path_key(name: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"jetspec: {name} must be a path (a non-empty "
                         f"string), got {value!r}")
    return value


HEAD_TYPES = ("auto", "causal", "bidirectional")

# Keys of JetSpec's vLLM fork (its SpeculativeConfig, method "dflash") with
# a meaning here: the fork's name -> ours. Its budget counts the root as
# ours does (its tree builder starts from the root node).
FORK_ALIASES = {"max_tree_budget": "tree_budget", "tree_draft": "tree_algo"}
# The fork's tree_draft values -> our tree_algo ("opt_prefix" is the top-B
# prefix-probability tree, DDTree: our topb_prefix).
FORK_TREE_DRAFT = {"accum_logp": "accum_logp",
                   "top2gap_fanout": "top2gap_fanout",
                   "opt_prefix": "topb_prefix"}
# The fork's keys whose one value is what this plugin does anyway (accepted
# and logged) and what to say for any other value.
FORK_NO_OPS = {
    "tree_kv_layout": ("physical", "vllm-jetspec moves the accepted path's "
                       "K/V to consecutive slots after each verify (the "
                       "fork's 'physical' layout); it has no other layout"),
    "tree_attn_kernel": ("triton", "vllm-jetspec verifies trees with its "
                         "Triton tree-attention kernel on CUDA (a torch "
                         "reference on CPU; JETSPEC_ATTENTION=triton runs the "
                         "kernel there); it has no 'optimus' kernel"),
    "tree_construction": ("breadth_first", "trees are built by tree_algo "
                          "(accum_logp | topb_prefix | top2gap_fanout | "
                          "chain); there is no depth-first spine mode"),
    "max_draft_passes": (0, "vllm-jetspec drafts once per round (no "
                         "prune/regrow passes); use tree_algo"),
}
# The fork's keys with no counterpart: the message names what we have.
FORK_REFUSED = {
    "tree_hybrid_alpha": "goes with the fork's tree_draft 'hybrid', which "
                         "vllm-jetspec does not have (tree_algo: "
                         "accum_logp | topb_prefix | top2gap_fanout | chain)",
    "tree_prune_ratio": "goes with the fork's max_draft_passes > 0 "
                        "(prune/regrow), which vllm-jetspec does not have",
    "num_cudagraph_tree_captures": "vllm-jetspec captures CUDA graphs for "
                                   "verify steps by default on GPUs "
                                   "(enforce_eager=True or JETSPEC_EAGER=1 "
                                   "for none)",
    "speculative_token_tree": "jetspec builds a tree per request and step "
                              "(tree_budget, tree_width, tree_algo), not a "
                              "static one",
}


def _fork_keys(spec: dict) -> None:
    """Map the keys of JetSpec's vLLM fork to ours in ``spec`` (in place),
    or raise one error naming the key and what to use instead."""
    for fork, ours in FORK_ALIASES.items():
        if fork not in spec:
            continue
        value = spec.pop(fork)
        if fork == "tree_draft":
            if value not in FORK_TREE_DRAFT:
                raise ValueError(
                    f"jetspec: tree_draft {value!r} (a key of JetSpec's "
                    f"vLLM fork) has no counterpart here; use tree_algo, one "
                    f"of {TREE_ALGOS} (tree_draft accum_logp, top2gap_fanout "
                    f"and opt_prefix map to tree_algo accum_logp, "
                    f"top2gap_fanout and topb_prefix)")
            value = FORK_TREE_DRAFT[value]
        if ours in spec and spec[ours] != value:
            raise ValueError(f"jetspec: {fork} ({value!r}, JetSpec's fork) "
                             f"and {ours} ({spec[ours]!r}) disagree; give "
                             f"{ours} alone")
        spec[ours] = value
    for key, (same, why) in FORK_NO_OPS.items():
        if key not in spec:
            continue
        value = spec.pop(key)
        if value != same or isinstance(value, bool):
            raise ValueError(f"jetspec: {key} {value!r} (a key of JetSpec's "
                             f"vLLM fork) is not supported: {why}; drop it")
        logger.info("jetspec: %s %r (JetSpec's fork) is what vllm-jetspec "
                    "does: %s", key, value, why.split(";")[0])
    for key, why in FORK_REFUSED.items():
        if key in spec:
            raise ValueError(f"jetspec: {key} (a key of JetSpec's vLLM "
                             f"fork) has no counterpart here: {why}; drop it")


def _vllm_keys() -> set[str] | None:
    """The keys vLLM's SpeculativeConfig accepts (None without vLLM)."""
    try:
        from dataclasses import fields

        from vllm.config import SpeculativeConfig
    except ImportError:
        return None
    return {f.name for f in fields(SpeculativeConfig)}


def _check_keys(spec: dict) -> None:
    """Unknown keys: one error naming the key (vLLM's own would come later,
    as a pydantic error about method 'dflash')."""
    ours = set(JETSPEC_KEYS) | {"method", "model", "num_speculative_tokens",
                                "head_type"}
    known = _vllm_keys()
    if known is None:
        return
    known |= ours
    for key in spec:
        if key not in known:
            import difflib
            close = difflib.get_close_matches(
                str(key), sorted(ours | set(FORK_ALIASES)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"jetspec: unknown speculative_config key {key!r}{hint}; "
                f"jetspec keys: {', '.join(sorted(ours - {'method'}))}, and "
                f"vLLM's SpeculativeConfig fields")


def resolve_head(model, revision=None) -> tuple[str, bool]:
    """A head's local directory from ``model``: a directory, a Hugging Face
    repo id, either with ``::subfolder`` (JetSpec's form for a repo holding
    several heads). Repo ids go through ``huggingface_hub`` (its cache,
    ``HF_HUB_OFFLINE`` and token as for any vLLM model). Returns (directory,
    whether it came from the hub)."""
    if not model:
        raise ValueError("jetspec: 'model' (the head's directory or "
                         "Hugging Face repo id) is required")
    if not isinstance(model, str):
        raise ValueError(f"jetspec: model must be the head's directory or "
                         f"repo id (a string), got {model!r}")
    repo, _, sub = model.partition("::")
    hub = False
    if os.path.isdir(repo):
        path = os.path.join(repo, sub) if sub else repo
    elif repo.count("/") == 1 and not repo.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            root = snapshot_download(
                repo, revision=revision,
                allow_patterns=[f"{sub}/*"] if sub else None)
        except Exception as e:       # offline, unknown repo, no access ...
            raise ValueError(
                f"jetspec: model {model!r}: no such local directory, and the "
                f"Hugging Face hub gave no head ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        path, hub = (os.path.join(root, sub) if sub else root), True
    else:
        raise ValueError(f"jetspec: model {model!r}: no head directory "
                         f"{repo!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"jetspec: model {model!r}: no head config at "
                         f"{os.path.join(path, 'config.json')}")
    return path, hub


def read_head(path: str, target_hf_config):
    """The head's config, checked against the target: one ``ValueError``
    naming the key (prefixed with jetspec's ``model``)."""
    from ..head import HeadConfig

    with open(os.path.join(path, "config.json")) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"jetspec: model: {path}/config.json is not "
                             f"JSON ({e})") from None
    if "DFlashDraftModel" not in (raw.get("architectures") or []):
        raise ValueError(f"jetspec: {path} is not a DFlash-format head "
                         f"(architectures {raw.get('architectures')})")
    try:
        head = HeadConfig.from_dict(raw)
        head.check_target(target_hf_config)
    except ValueError as e:
        raise ValueError(f"jetspec: model {path}: {e}") from None
    return head


def parse(spec: dict, target_hf_config) -> tuple[dict, JetSpecSettings]:
    """Validate a jetspec ``speculative_config`` dict; return the dict vLLM
    builds its (dflash) config from, and the tree settings. Raises
    ``ValueError`` with one clear message naming the key on bad input.
    ``tree_budget`` 1 (the root alone, no draft token) returns ``None``:
    plain decoding. The keys of JetSpec's vLLM fork are mapped where they
    mean something here (``max_tree_budget``, ``tree_draft``,
    ``head_type``) and refused with the key to use otherwise."""
    spec = dict(spec)
    spec.pop("method")
    _fork_keys(spec)
    _check_keys(spec)
    budget = spec.pop("tree_budget", DEFAULT_BUDGET)
    cost_model = spec.pop("cost_model", None)
    budget_max = spec.pop("tree_budget_max", None)
    auto = budget == "auto"
    if auto:
        if cost_model is not None:
            _path_key("cost_model", cost_model)
        budget, cost_model = _auto_budget(cost_model, budget_max)
    else:
        if cost_model is not None or budget_max is not None:
            raise ValueError("jetspec: 'cost_model' and 'tree_budget_max' "
                             "go with tree_budget 'auto'")
        if isinstance(budget, str):
            raise ValueError(f"jetspec: tree_budget must be an integer in "
                             f"[1, {MAX_BUDGET}] or 'auto', got {budget!r}")
        budget = _int_in("tree_budget", budget, 1, MAX_BUDGET)
    width = _int_in("tree_width", spec.pop("tree_width", DEFAULT_WIDTH),
                    1, 64)
    algo = spec.pop("tree_algo", DEFAULT_ALGO)
    if not isinstance(algo, str) or algo not in TREE_ALGOS:
        raise ValueError(f"jetspec: tree_algo must be one of {TREE_ALGOS}, "
                         f"got {algo!r}")
    if auto and algo not in AUTO_ALGOS:
        raise ValueError(f"jetspec: tree_budget 'auto' needs tree_algo in "
                         f"{AUTO_ALGOS} (a smaller budget's tree is then the "
                         f"most probable nodes of the larger), got {algo!r}")
    head_type = spec.pop("head_type", "auto")
    if head_type not in HEAD_TYPES:
        raise ValueError(f"jetspec: head_type must be one of {HEAD_TYPES}, "
                         f"got {head_type!r}")
    path, hub = resolve_head(spec.get("model"), spec.get("revision"))
    spec["model"] = path
    if hub:
        spec.pop("revision", None)     # resolved: vLLM reads the snapshot
    head = read_head(path, target_hf_config)
    causal = head.causal if head_type == "auto" else head_type == "causal"
    depth = spec.pop("num_speculative_tokens", None)
    depth = head.block_size - 1 if depth is None else depth
    depth = _int_in("num_speculative_tokens (draft depth)", depth, 1,
                    head.block_size - 1)
    if causal:
        # A tree of `budget` nodes (root included) is at most budget - 1
        # deep; in a causal head the first slots' logits do not depend on
        # the later ones: drafting fewer slots gives the same trees for
        # less work.
        depth = max(1, min(depth, budget - 1))
    replay = spec.pop("replay", None)
    if replay is not None:
        from ..replay import load_replay
        load_replay(_path_key("replay", replay))   # one clear error now
        replay = os.path.abspath(replay)
    settings = JetSpecSettings(budget=budget, width=width, algo=algo,
                               depth=depth, replay=replay,
                               cost_model=cost_model,
                               auto_online=auto and cost_model is None,
                               causal=causal,
                               head=head_summary(head, causal, head_type))
    if budget == 1:
        # The root alone: no draft token to verify, i.e. plain decoding.
        return None, settings
    spec.update(method="dflash", num_speculative_tokens=budget - 1)
    return spec, settings


def head_summary(head, causal: bool, head_type: str) -> dict:
    """What vLLM is handed as the head's ``dflash_config`` (and, for the
    start-up log, how the file was read)."""
    return dict(mask_token_id=head.mask_token_id,
                target_layer_ids=list(head.target_layer_ids),
                causal=causal, block_size=head.block_size,
                layers=head.num_hidden_layers,
                derived=head.layer_ids_derived, dialect=head.dialect,
                file_causal=head.causal, head_type=head_type)


DFLASH_KEYS_FOR_VLLM = ("mask_token_id", "target_layer_ids", "causal")


def hand_head_to_vllm(cfg, s: JetSpecSettings) -> None:
    """Write the resolved ``dflash_config`` (causality from the head's file
    in either dialect or from ``head_type``, target layer ids derived when
    the file has none) into the draft model's hf config vLLM built, so its
    DFlash model (``qwen3_dflash.py`` reads ``dflash_config.causal``), the
    runner's aux-layer list and the drafter's mask token read what the
    head's author meant. vLLM wraps the head's config in ``EAGLEConfig``
    (a copy of its attributes, and the original as ``.model``): all are
    set."""
    h = s.head
    if not h:
        return
    dm = cfg.draft_model_config
    objs = [dm.hf_config, getattr(dm.hf_config, "model", None),
            getattr(dm, "hf_text_config", None)]
    for obj in {id(o): o for o in objs if o is not None}.values():
        dc = dict(getattr(obj, "dflash_config", None) or {})
        dc.update({k: h[k] for k in DFLASH_KEYS_FOR_VLLM})
        for k in ("causal_head", "target_hidden_size"):   # JetSpec's only
            dc.pop(k, None)
        setattr(obj, "dflash_config", dc)
    how = (f"dflash_config.causal_head {h['file_causal']}"
           if h["dialect"] == "jetspec" else
           f"dflash_config.causal {h['file_causal']}")
    if h["head_type"] != "auto":
        how += f", head_type {h['head_type']!r}"
    ids = ("derived from num_target_layers as JetSpec does"
           if h["derived"] else "from dflash_config.target_layer_ids")
    logger.info("jetspec: head %s: %d layers, block %d, %s (%s), reads "
                "target layers %s (%s), mask token %d", dm.model,
                h["layers"], h["block_size"],
                "causal" if h["causal"] else "bidirectional", how,
                h["target_layer_ids"], ids, h["mask_token_id"])
    if h["causal"] != h["file_causal"]:
        logger.warning("jetspec: head_type %r overrides the head's own "
                       "%s attention: drafts will differ from what it was "
                       "trained for (output stays lossless)", h["head_type"],
                       "causal" if h["file_causal"] else "bidirectional")


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


def env_choice(name: str, choices: tuple[str, ...], default: str,
               env=None) -> str:
    """The value of environment variable ``name`` (``env``: a mapping in
    its place), stripped, ``default`` when unset; one clear error naming
    the variable and its choices for anything else. The jetspec switches
    (``JETSPEC_TREE_BUILD``, ``JETSPEC_TREE_TILES``, ...) read through it."""
    v = (os.environ if env is None else env).get(name, default).strip()
    if v not in choices:
        listed = " or ".join(repr(c) for c in choices)
        raise ValueError(f"jetspec: {name} must be {listed}, got {v!r}")
    return v


VERIFY_ROWS_ENV = "JETSPEC_VERIFY_ROWS"


def verify_rows_setting(env=None) -> str:
    """``JETSPEC_VERIFY_ROWS``: how a V2 round does its small work around
    the target's forward and the draft pass, ``kernel`` (default, CUDA:
    Triton launches over vLLM's flat rows, ``kernels/tree_verify.py`` --
    the verify step's positions and acceptance, the trees' store after
    the draft pass, an all-tree step's attention metadata) or ``torch``
    (the tree core through the padded layout, one CUDA graph per shape,
    and torch ops; the same tokens, moves and order)."""
    return env_choice(VERIFY_ROWS_ENV, ("kernel", "torch"), "kernel", env)


V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


AUTO_NO_TAU = ("its cost model has no measured tokens per round ('tau'), "
               "which the V2 runner's policy needs; python -m "
               "vllm_jetspec.tools.bench writes it since 2026-12-04")
AUTO_NO_ASYNC = ("async scheduling is off (async_scheduling=False): on the "
                 "V2 runner a per-step draft count reaches the scheduler "
                 "only through async scheduling's draft placeholders")


def auto_v1_reason(settings, engine_args) -> str | None:
    """Why ``tree_budget: "auto"`` cannot run the V2 runner's policy with
    these settings and engine arguments (None: it can, or not auto)."""
    if not settings.auto:
        return None
    from ..autobudget import has_tau
    if not settings.auto_online and not has_tau(settings.cost_model):
        return AUTO_NO_TAU
    if getattr(engine_args, "async_scheduling", None) is False:
        return AUTO_NO_ASYNC
    return None


def select_runner(env: dict | None = None, on_cuda: bool | None = None,
                  auto_on_v1: str | None = None) -> str:
    """Which of vLLM's model runners a jetspec engine runs on: ``"v2"`` on
    CUDA (the device-side, asynchronous rounds of ``vllm_patches.v2``;
    vLLM's own default there; ``tree_budget: "auto"`` included, through
    vLLM's dynamic speculative decoding, ``v2.auto``), ``"v1"`` on vLLM's
    CPU platform (its only runner), when the user sets
    ``VLLM_USE_V2_MODEL_RUNNER=0`` (the synchronous V1 hooks,
    ``vllm_patches.runner``), and for ``auto`` where the V2 policy cannot
    work (``auto_on_v1``, the reason, said in a warning: a cost model
    without measured tokens per round, ``AUTO_NO_TAU``, or async
    scheduling turned off, ``AUTO_NO_ASYNC``; the V1 hooks' policy reads
    the head's own estimates after each draft pass instead). Set in this
    process's environment, which the engine's processes inherit."""
    env = os.environ if env is None else env
    if on_cuda is None:
        from vllm.platforms import current_platform
        on_cuda = current_platform.is_cuda()
    v = (env.get(V2_RUNNER_ENV) or "").strip().lower()
    if on_cuda and v not in ("0", "false", "no"):
        if not auto_on_v1:
            env[V2_RUNNER_ENV] = "1"
            return "v2"
        logger.warning("jetspec: tree_budget 'auto' runs on vLLM's V1 model "
                       "runner (synchronous rounds): %s", auto_on_v1)
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


def fit_batch_limits(args, budget: int, slots: int, seqs_given: bool,
                     tokens_given: bool) -> None:
    """Batch limits a jetspec engine can run with, on ``args`` (vLLM's
    ``EngineArgs``, after vLLM filled its defaults).

    A verify step schedules a whole tree (``budget`` tokens) per sequence,
    and vLLM keeps ``slots`` more per sequence free for the draft pass
    (``max_num_scheduled_tokens = max_num_batched_tokens - slots x
    max_num_seqs``, ``VllmConfig._set_max_num_scheduled_tokens``). vLLM's
    serving defaults on a large GPU (1024 sequences, 8192 tokens) leave that
    negative for any draft depth above 8, and vLLM refuses to start. Limits
    the user left to vLLM are made to fit a whole tree per sequence: with
    ``max_num_seqs`` given, ``max_num_batched_tokens`` is raised; otherwise
    ``max_num_seqs`` is lowered (a step keeps vLLM's token budget, which
    bounds its memory and latency). Both given and unworkable (no token left
    to schedule): one error naming the flags. Both given and workable but
    too small for whole trees: the runner warns that trees are cut."""
    per_seq = budget + slots
    seqs, tokens = args.max_num_seqs, args.max_num_batched_tokens
    need = (f"a whole tree per sequence needs max_num_batched_tokens >= "
            f"max_num_seqs x (tree_budget {budget} + {slots} draft-pass "
            f"slots)")
    if seqs_given and tokens_given:
        if tokens - seqs * slots <= 0:
            raise ValueError(
                f"jetspec: --max-num-batched-tokens {tokens} and "
                f"--max-num-seqs {seqs} leave no token to schedule: vLLM "
                f"keeps {slots} slots per sequence free for the draft pass "
                f"({seqs} x {slots} = {seqs * slots}); {need} = "
                f"{seqs * per_seq}: raise --max-num-batched-tokens or lower "
                f"--max-num-seqs (or leave one of them to jetspec)")
        return
    if tokens >= seqs * per_seq:
        return
    if seqs_given:
        args.max_num_batched_tokens = seqs * per_seq
        logger.info("jetspec: max_num_batched_tokens %d (vLLM's default) "
                    "raised to %d: %s (max_num_seqs %d given)", tokens,
                    args.max_num_batched_tokens, need, seqs)
        return
    fit = tokens // per_seq
    if fit >= 1:
        args.max_num_seqs = fit
        logger.info("jetspec: max_num_seqs %d (vLLM's default) lowered to "
                    "%d: %s (max_num_batched_tokens %d%s); give "
                    "--max-num-seqs and --max-num-batched-tokens to choose",
                    seqs, fit, need, tokens,
                    " given" if tokens_given else ", vLLM's default")
        return
    if tokens_given:
        if tokens - slots <= 0:
            raise ValueError(
                f"jetspec: --max-num-batched-tokens {tokens} leaves no token "
                f"to schedule: vLLM keeps {slots} slots per sequence free for "
                f"the draft pass; {need} = {per_seq} for one sequence")
        args.max_num_seqs = 1
        logger.info("jetspec: max_num_seqs %d (vLLM's default) lowered to 1 "
                    "(max_num_batched_tokens %d given; %s = %d: trees will "
                    "be cut)", seqs, tokens, need, per_seq)
        return
    args.max_num_seqs, args.max_num_batched_tokens = 1, per_seq
    logger.info("jetspec: max_num_seqs %d and max_num_batched_tokens %d "
                "(vLLM's defaults) set to 1 and %d: %s", seqs, tokens,
                per_seq, need)


def patched_set_default_batch_limits(orig):
    """Wraps ``EngineArgs._set_default_max_num_seqs_and_batched_tokens_args``
    (called by ``create_engine_config`` right after
    ``create_speculative_config``): after vLLM filled its usage-context
    defaults, ``fit_batch_limits`` for a jetspec engine."""

    def _set_default_max_num_seqs_and_batched_tokens_args(
            self, usage_context, model_config, parallel_config):
        seqs_given = self.max_num_seqs is not None
        tokens_given = self.max_num_batched_tokens is not None
        orig(self, usage_context, model_config, parallel_config)
        fit = getattr(self, "_jetspec_fit", None)
        if fit is not None and getattr(
                self, "max_num_scheduled_tokens", None) is None:
            fit_batch_limits(self, *fit, seqs_given=seqs_given,
                             tokens_given=tokens_given)

    _set_default_max_num_seqs_and_batched_tokens_args._jetspec_wrapped = True
    return _set_default_max_num_seqs_and_batched_tokens_args


def patched_create_speculative_config(orig):
    """Wraps ``EngineArgs.create_speculative_config``."""

    def create_speculative_config(self, target_model_config,
                                  target_parallel_config):
        spec = self.speculative_config
        self._jetspec_fit = None    # (budget, draft-pass slots) if jetspec
        if not (isinstance(spec, dict) and spec.get("method") == "jetspec"):
            return orig(self, target_model_config, target_parallel_config)
        self.speculative_config, settings = parse(
            spec, target_model_config.hf_config)
        runner = select_runner(auto_on_v1=auto_v1_reason(settings, self))
        refuse_cpu_expert_parallel(target_parallel_config)
        if runner == "v1":
            refuse_async_scheduling(self)
        graphs_on_gpu(self, target_model_config)
        if self.speculative_config is None:
            logger.info("jetspec: tree_budget 1 is the root alone (no draft "
                        "token): decoding without speculation")
            return None
        cfg = orig(self, target_model_config, target_parallel_config)
        hand_head_to_vllm(cfg, settings)
        if runner == "v2" and settings.auto:
            # vLLM's dynamic speculative decoding: the scheduler's per-step
            # draft count (the policy's, v2/auto.py) and a FULL verify
            # graph per count it may pick.
            from .v2.auto import dynamic_schedule, make_policy
            object.__setattr__(cfg, "num_speculative_tokens_per_batch_size",
                               dynamic_schedule(make_policy(settings)))
        # A plain attribute: pickled with the config into every process.
        object.__setattr__(cfg, "jetspec", settings)
        # For the batch limits vLLM fills next (the slots as vLLM will
        # count them, through the patched property, now that the settings
        # are attached).
        self._jetspec_fit = (settings.budget,
                             cfg.max_num_new_slots_for_drafting)
        return cfg

    create_speculative_config._jetspec_wrapped = True
    return create_speculative_config
