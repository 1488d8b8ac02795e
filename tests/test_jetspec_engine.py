"""`"method": "jetspec"` in the real vLLM engine (CPU): greedy output is
token-identical to the same engine without speculation, for every tree
algorithm, with a head trained here so that trees are really accepted;
and every bad config gives one clear error at start-up."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from engine_io import engine_result, result, run_engines, run_script
from models import tiny_qwen3_in_memory
from shared import once

# JETSPEC_TEST_EAGER=0 (on a GPU): the engines compile and capture CUDA
# graphs; by default they run eagerly (as on CPU, where vLLM has no graphs).
# One engine per run (engine_io.run_engines: one after another in one
# process, each with its own environment and log).
RUN = textwrap.dedent("""
    import json, os, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        prompts = json.loads(sys.argv[2])

        def body(run):
            eager = os.environ.get("JETSPEC_TEST_EAGER") != "0"
            llm = LLM(sys.argv[1], skip_tokenizer_init=True, dtype="float32",
                      enforce_eager=eager, gpu_memory_utilization=0.3,
                      max_model_len=512, max_num_batched_tokens=512,
                      max_num_seqs=4, enable_prefix_caching=True,
                      speculative_config=run["spec"], disable_log_stats=False)
            try:
                profile = os.environ.get("JETSPEC_PROFILE") == "1"
                if profile:
                    # reset after start-up
                    llm.collective_rpc("jetspec_profile")
                outs = llm.generate(
                    [TokensPrompt(prompt_token_ids=p) for p in prompts],
                    SamplingParams(max_tokens=48, temperature=0,
                                   detokenize=False))
                emit(run["key"], {
                    "result": [list(o.outputs[0].token_ids) for o in outs],
                    "metrics": {
                        x.name: getattr(x, "value", None)
                        or getattr(x, "values", None)
                        for x in llm.get_metrics()
                        if x.name.startswith("vllm:spec_decode_num")},
                    "profile": (llm.collective_rpc("jetspec_profile")[0]
                                if profile else None)})
            finally:
                shutdown(llm)

        each_engine(json.loads(sys.argv[3]), body)
""")

# On a GPU with graphs: jetspec verify steps must replay FULL graphs (every
# request verifying a whole tree), checked from vLLM's capture log and the
# runner's count of dispatched modes (JETSPEC_PROFILE=1).
GPU_GRAPHS = os.environ.get("JETSPEC_TEST_EAGER") == "0" and \
    torch.cuda.is_available()

# Eight prompts of mixed lengths (batch > 1, chunked prefill at 512 tokens
# per step with four sequences, a shared prefix for the prefix cache).
PROMPTS = [[(7 * i + 3) % 30 for i in range(n)]
           for n in (3, 40, 100, 7, 250, 12)] + [[5, 6, 7] * 30,
                                                 [5, 6, 7] * 31 + [1]]


# The engine tests run apart (each wherever an xdist worker is free, see the
# root conftest.py); the trained head and the no-spec output they compare
# against are built once per session (tests/shared.py).
pytestmark = pytest.mark.independent


def train_tiny(d):
    from vllm_jetspec.reference import target_greedy
    from vllm_jetspec.tools.train import FitConfig, fit

    torch.set_num_threads(1)
    target = tiny_qwen3_in_memory(vocab=32, hidden=128, head_dim=32)
    target.save_pretrained(d / "target")
    g = torch.Generator().manual_seed(0)
    with open(d / "data.jsonl", "w") as f:
        for _ in range(64):
            p = torch.randint(0, 32, (6,), generator=g).tolist()
            f.write(json.dumps(dict(prompt_ids=p, response_ids=target_greedy(
                target, p, 48))) + "\n")
    fit(str(d / "target"), str(d / "data.jsonl"), str(d / "head"),
        FitConfig(layers=2, target_layer_ids=(0, 2), block_size=8,
                  steps=400, batch_size=8, anchors_per_seq=8, max_len=64,
                  lr=3e-3, warmup=10, log_every=100, save_every=400),
        device="cpu", progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny fp32 target (vocab 32) and a two-layer head distilled from
    it here, so that trees get accepted branches (and the per-layer context
    k_norm of draft layer 1 matters). ``JETSPEC_TEST_TINY=DIR``: the pair
    ``train_tiny`` built into DIR before (a GPU call then skips the
    minutes of CPU training: scripts/gpu/README.md)."""
    given = os.environ.get("JETSPEC_TEST_TINY")
    if given:
        d = Path(given)
        if not ((d / "target").is_dir() and (d / "head").is_dir()):
            raise FileNotFoundError(f"JETSPEC_TEST_TINY={given}: no "
                                    "target/ and head/ there")
        return d / "target", d / "head"
    d = once(tmp_path_factory, "jetspec-tiny", train_tiny)
    return d / "target", d / "head"


def run_many(tmp_path, target, runs):
    """Engines one after another in one process: ``runs`` maps a key to
    (spec, env, profile); returns {key: run} for ``got``."""
    return run_engines(tmp_path / "run.py", RUN,
                       [target, json.dumps(PROMPTS)],
                       [dict(key=k, spec=spec, env=dict(
                           env or {}, **({"JETSPEC_PROFILE": "1"}
                                         if profile else {})))
                        for k, (spec, env, profile) in runs.items()])


def got(runs, key, profile=False):
    """tokens, spec-decode metrics, log (and with ``profile`` the runner's
    profile: JETSPEC_PROFILE=1 in the engine) of run ``key``."""
    r = engine_result(runs, key)
    out = (r["result"], r["metrics"], r["log"])
    return out + (r["profile"],) if profile else out


def run(tmp_path, target, spec, env=None, profile=False):
    """``got`` for a single engine."""
    return got(run_many(tmp_path, target, {"run": (spec, env, profile)}),
               "run", profile)


@pytest.fixture(scope="module")
def no_spec(tiny, tmp_path_factory):
    def build(d):
        tokens, _, _ = run(d, tiny[0], None)
        (d / "tokens.json").write_text(json.dumps(tokens))

    d = once(tmp_path_factory, "jetspec-no-spec", build)
    return json.loads((d / "tokens.json").read_text())


def reference_stats(target_dir, head_dir, algo, budget):
    """Rounds and accepted drafts of the reference decoder (the oracle) on
    the same target, head, prompts and tree settings."""
    from transformers import AutoModelForCausalLM

    from vllm_jetspec.head import load_head
    from vllm_jetspec.reference import ReferenceDecoder, TreeConfig

    target = AutoModelForCausalLM.from_pretrained(target_dir).float().eval()
    dec = ReferenceDecoder(target, load_head(head_dir),
                           TreeConfig(budget=budget, algo=algo))
    accepted: list[int] = []
    for p in PROMPTS:
        accepted += dec.generate(p, 48).accepted
    return accepted


GREEDY = [
    # budget 4 < depth + 1: the draft pass has more query slots per request
    # than the scheduler's draft slots (buffers sized for the depth).
    ("accum_logp", 4, None), ("accum_logp", 8, None),
    ("accum_logp", 64, None),
    # Tree construction, acceptance + K/V compaction and the draft pass
    # (draft_pass.py: vLLM's propose split into host work and a graphed
    # body) of every round through the graphs' static buffers
    # (graphed.HostGraph standing in for CUDA graphs): batch sizes 1-4 and
    # tree sizes change between rounds.
    ("topb_prefix", 64, "host"),
    ("top2gap_fanout", 64, None), ("chain", 8, None),
]
# The engines of GREEDY and of tree budget 1 run in two processes (batch
# "a": accum_logp and budget 1, "b": the others, about as long); each
# batch's tests run together.
BATCH = {g: "a" if g[0] == "accum_logp" else "b" for g in GREEDY}
IN_BATCH = {b: pytest.mark.xdist_group(f"jetspec-greedy-{b}") for b in "ab"}


def selected_runs(items) -> set[str]:
    """The keys of the GREEDY / budget-1 runs whose tests this session
    runs (after ``-k``): a GPU call that picks one test starts one engine,
    not its batch's four (≈ 100 s each with graphs there)."""
    keys = set()
    for item in items:
        name = getattr(item, "originalname", "")
        if name == "test_greedy_equals_no_spec":
            p = item.callspec.params
            keys.add(f"{p['algo']}-{p['budget']}-{p['graphs']}")
        elif name == "test_budget_one_engine_equals_no_spec":
            keys.add("budget-1")
    return keys


@pytest.fixture(scope="module")
def greedy_runs(tiny, tmp_path_factory, request):
    """greedy_runs(batch): the runs of that batch's engines (those of the
    session's selected tests)."""
    target, head = tiny
    done = {}
    wanted = selected_runs(request.session.items)

    def runs_of(batch):
        if batch not in done:
            runs = {f"{a}-{b}-{g}": ({"method": "jetspec",
                                      "model": str(head), "tree_budget": b,
                                      "tree_algo": a},
                                     g and {"JETSPEC_TREE_GRAPHS": g,
                                            "JETSPEC_DRAFT_GRAPHS": g},
                                     GPU_GRAPHS)
                    for a, b, g in GREEDY if BATCH[a, b, g] == batch
                    and f"{a}-{b}-{g}" in wanted}
            if batch == "a" and "budget-1" in wanted:
                runs["budget-1"] = ({"method": "jetspec", "model": str(head),
                                     "tree_budget": 1}, None, False)
            done[batch] = run_many(
                tmp_path_factory.mktemp(f"greedy-{batch}"), target, runs)
        return done[batch]
    return runs_of


@pytest.mark.engine
@pytest.mark.parametrize("algo,budget,graphs", [
    pytest.param(*g, marks=IN_BATCH[BATCH[g]]) for g in GREEDY])
def test_greedy_equals_no_spec(tiny, no_spec, greedy_runs, algo, budget,
                               graphs):
    target, head = tiny
    tokens, m, log, *prof = got(greedy_runs(BATCH[algo, budget, graphs]),
                                f"{algo}-{budget}-{graphs}",
                                profile=GPU_GRAPHS)
    assert f"jetspec: tree budget {budget}" in log
    if GPU_GRAPHS:
        # V1 runner's capture log / V2's
        assert "Capturing CUDA graphs (decode, FULL)" in log or \
            "Capturing CUDA graphs (FULL)" in log
        assert prof[0]["graph_modes"].get("FULL", 0) > 0, prof[0]
        if os.environ.get("JETSPEC_DRAFT_GRAPHS", "1") == "1":
            # ... and draft passes replayed graphs of their own
            # (draft_pass.py)
            assert prof[0]["draft_modes"].get("graph", 0) > 0, prof[0]
            assert "jetspec: draft pass replays a graph per shape (CUDA)" \
                in log
    if graphs and "(V2 runner: device-side rounds)" not in log:
        # Host graphs are the V1 hooks' (vllm_patches.runner; vLLM's CPU
        # runner): the V2 runner (CUDA) builds trees and accepts inside
        # the draft pass's and the verify step's CUDA graphs, and
        # JETSPEC_TREE_GRAPHS / JETSPEC_DRAFT_GRAPHS do not apply to it.
        for what in ("tree construction", "acceptance + compaction",
                     "draft pass"):
            assert f"jetspec: {what} replays a graph per shape (host)" in log
        assert "jetspec: the draft pass replays one host graph per shape" \
            in log
    assert tokens == no_spec
    # Round by round the engine does what the oracle does: the same number
    # of tree rounds, and the same accepted depth in each (vLLM's
    # per-position counts are per depth).
    # (One comparison, so that a failure shows all three; where rounds
    # part and how close to a tie: scripts/gpu/round_diff.py.)
    acc = reference_stats(target, head, algo, budget)
    per_depth = m["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert (m["vllm:spec_decode_num_drafts"],
            m["vllm:spec_decode_num_accepted_tokens"], list(per_depth)) == \
        (len(acc), sum(acc), [sum(a > d for a in acc)
                              for d in range(len(per_depth))])
    assert sum(acc) > 0, "no draft was accepted: the test would be vacuous"


@pytest.mark.engine
def test_triton_backend_equals_no_spec(tiny, no_spec, tmp_path):
    """The Triton tree-attention backend (the CUDA path's kernel, run here in
    Triton's interpreter, JETSPEC_ATTENTION=triton) for every attention of
    the engine (prefill, chunked prefill, tree verify, the draft pass):
    tokens equal no-spec and the rounds equal the oracle's."""
    target, head = tiny
    tokens, m, log = run(tmp_path, target, {
        "method": "jetspec", "model": str(head), "tree_budget": 16,
        "tree_algo": "accum_logp"}, env={"JETSPEC_ATTENTION": "triton",
                                         "TRITON_INTERPRET": "1"})
    assert "jetspec Triton tree-attention backend in use" in log
    assert tokens == no_spec
    acc = reference_stats(target, head, "accum_logp", 16)
    assert m["vllm:spec_decode_num_drafts"] == len(acc)
    assert m["vllm:spec_decode_num_accepted_tokens"] == sum(acc)
    assert sum(acc) > 0


@pytest.mark.engine
def test_auto_budget_equals_no_spec(tiny, no_spec, tmp_path):
    """``tree_budget: "auto"`` choosing among budgets 4, 8 and 16 (and
    plain steps) step by step: tokens equal no-spec. On CPU (vLLM's V1
    runner) the V1 hooks choose after each draft pass, from the head's
    path probabilities; on a GPU the V2 runner's scheduler chooses before
    the trees exist (vLLM's dynamic speculative decoding, v2/auto.py),
    from the cost model's tau and the acceptance it saw, and the draft
    pass lays its trees out best first. With graphs (JETSPEC_TEST_EAGER=0)
    verify steps of the chosen budgets replay full graphs of their own
    query length (V1: vllm_patches.budget_graphs; V2: vLLM's graphs per
    dynamic-SD draft count)."""
    from vllm_jetspec.autobudget import CostModel

    target, head = tiny
    # Nearly flat costs: the head's confidence (V1) or the acceptance
    # seen (V2) decides the budget.
    flat = {1: 1.0, 4: 1.0}
    cost = CostModel(ar_ms=dict(flat), round_ms={
        4: {B: 1.05 for B in flat}, 8: {B: 1.1 for B in flat},
        16: {B: 1.2 for B in flat}}, tau={4: 1.8, 8: 2.2, 16: 2.5})
    cost.save(str(tmp_path / "cost.json"))
    tokens, m, log, prof = run(tmp_path, target, {
        "method": "jetspec", "model": str(head), "tree_budget": "auto",
        "cost_model": str(tmp_path / "cost.json"),
        "tree_algo": "accum_logp"}, profile=True)
    assert tokens == no_spec
    chosen = {b: n for b, n in prof["budgets"].items() if int(b) > 1}
    assert chosen and m["vllm:spec_decode_num_drafts"] > 0, prof
    v2 = "tree_budget 'auto' on the V2 runner" in log
    assert v2 == torch.cuda.is_available(), log[-3000:]
    if GPU_GRAPHS:
        # (the V1 hooks' graphs per budget: FULL@b in the profile, tested
        # on CPU-less GPUs before 2026-12-04, when auto moved to V2)
        assert "Capturing CUDA graphs (decode, FULL)" in log or \
            "Capturing CUDA graphs (FULL)" in log
        assert prof["graph_modes"].get("FULL", 0) > 0, prof


@pytest.mark.engine
def test_auto_without_a_cost_model_equals_no_spec(tiny, no_spec, tmp_path):
    """``tree_budget: "auto"`` alone: the policy that measures tokens and
    step times while serving (V1 runner on CPU: in the worker, after each
    draft pass; V2 on a GPU: the scheduler's) tries budgets 4, 8, 16 and
    plain steps; the tokens equal no-spec."""
    target, head = tiny
    tokens, m, log, prof = run(tmp_path, target, {
        "method": "jetspec", "model": str(head), "tree_budget": "auto",
        "tree_budget_max": 16, "tree_algo": "accum_logp"}, profile=True)
    assert tokens == no_spec
    assert "measured while serving" in log, log[-3000:]
    chosen = {int(b) for b, n in prof["budgets"].items() if n}  # JSON keys
    assert chosen <= {1, 4, 8, 16} and len(chosen) >= 2, prof
    assert m["vllm:spec_decode_num_drafts"] > 0


# --- start-up errors (in-process, no engine) ----------------------------------

@pytest.fixture(scope="module")
def parse_env(tiny):
    import vllm_jetspec
    vllm_jetspec.register()
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(tiny[0]), str(tiny[1])


@pytest.mark.parametrize("extra,msg", [
    (dict(tree_budget=0), "tree_budget must be an integer in [1, 256]"),
    (dict(tree_budget=257), "tree_budget must be an integer in [1, 256]"),
    (dict(tree_budget="64"), "tree_budget must be an integer"),
    (dict(tree_width=0), "tree_width must be an integer"),
    (dict(tree_algo="beam"), "tree_algo must be one of"),
    (dict(num_speculative_tokens=8), "num_speculative_tokens (draft depth)"),
])
def test_bad_tree_settings(parse_env, extra, msg):
    from vllm_jetspec.vllm_patches.config import parse
    hf, head = parse_env
    with pytest.raises(ValueError) as e:
        parse(dict(method="jetspec", model=head, **extra), hf)
    assert msg in str(e.value)


def test_missing_or_foreign_head(parse_env, tmp_path):
    from vllm_jetspec.head import HeadConfig, random_head, save_head
    from vllm_jetspec.vllm_patches.config import parse
    hf, _ = parse_env
    with pytest.raises(ValueError, match="'model'"):
        parse(dict(method="jetspec"), hf)
    with pytest.raises(ValueError, match="no head config"):
        parse(dict(method="jetspec", model=str(tmp_path)), hf)
    other = tiny_qwen3_in_memory(vocab=64, hidden=128, head_dim=32)
    hc = HeadConfig.for_target(other.config, num_layers=1,
                               target_layer_ids=[0], block_size=4)
    save_head(random_head(hc), hc, tmp_path / "foreign")
    with pytest.raises(ValueError, match="does not fit the target"):
        parse(dict(method="jetspec", model=str(tmp_path / "foreign")), hf)


def test_auto_budget_and_replay_settings(parse_env, tmp_path):
    from vllm_jetspec.autobudget import CostModel
    from vllm_jetspec.vllm_patches.config import parse
    hf, head = parse_env
    path = str(tmp_path / "cost.json")
    CostModel({1: 5.0}, {4: {1: 6.0}, 16: {1: 8.0}}).save(path)
    base = dict(method="jetspec", model=head)
    for extra, msg in [
            (dict(tree_budget="auto", tree_algo="chain"),
             "needs tree_algo in"),
            (dict(tree_budget="auto", cost_model=str(tmp_path / "no")),
             "does not exist"),
            (dict(tree_budget="auto", cost_model=path, tree_budget_max=3),
             "no budget in [2, 3]"),
            (dict(tree_budget="auto", cost_model=path, tree_algo="chain"),
             "needs tree_algo in"),
            (dict(tree_budget=16, cost_model=path),
             "go with tree_budget 'auto'"),
            (dict(replay=str(tmp_path / "none.json")), "replay file")]:
        with pytest.raises(ValueError) as e:
            parse(dict(base, **extra), hf)
        assert msg in str(e.value), (extra, str(e.value))
    spec, s = parse(dict(base, tree_budget="auto", cost_model=path), hf)
    assert s.auto and s.budget == 16 and spec["num_speculative_tokens"] == 15
    spec, s = parse(dict(base, tree_budget="auto", cost_model=path,
                         tree_budget_max=8), hf)
    assert s.budget == 8 and spec["num_speculative_tokens"] == 7
    assert not s.auto_online
    # without a cost model: measured while serving (V2 runner), among
    # 4 ... 64 and the largest
    spec, s = parse(dict(base, tree_budget="auto"), hf)
    assert s.auto and s.auto_online and s.cost_model is None
    assert s.budget == 64 and s.online_budgets == [4, 8, 16, 32, 64]
    assert spec["num_speculative_tokens"] == 63
    _, s = parse(dict(base, tree_budget="auto", tree_budget_max=24), hf)
    assert s.online_budgets == [4, 8, 16, 24]


def test_budget_one_is_plain_decoding(parse_env):
    from vllm_jetspec.vllm_patches.config import parse
    hf, head = parse_env
    spec, s = parse(dict(method="jetspec", model=head, tree_budget=1), hf)
    assert spec is None and s.budget == 1


@pytest.mark.engine
@IN_BATCH["a"]
def test_budget_one_engine_equals_no_spec(no_spec, greedy_runs):
    tokens, m, log = got(greedy_runs("a"), "budget-1")
    assert "decoding without speculation" in log
    assert tokens == no_spec


def test_jetspec_selects_its_runner():
    """On CUDA a jetspec engine runs vLLM's V2 runner (device-side rounds,
    ``vllm_patches.v2``) unless the user sets VLLM_USE_V2_MODEL_RUNNER=0
    (the V1 hooks); on CPU vLLM's V1 runner, its only one."""
    from vllm_jetspec.vllm_patches.config import select_runner

    for on_cuda, given, runner, env in [
            (True, None, "v2", "1"), (True, "1", "v2", "1"),
            (True, "0", "v1", "0"), (True, "false", "v1", "0"),
            (False, None, "v1", "0"), (False, "1", "v1", "0")]:
        e = {} if given is None else {"VLLM_USE_V2_MODEL_RUNNER": given}
        assert select_runner(e, on_cuda=on_cuda) == runner
        assert e == {"VLLM_USE_V2_MODEL_RUNNER": env}
    # tree_budget "auto" runs V2 unless its cost model lacks tau or async
    # scheduling is off (the reason is said)
    from vllm_jetspec.vllm_patches.config import AUTO_NO_ASYNC, AUTO_NO_TAU
    for auto_on_v1, runner in [(None, "v2"), (AUTO_NO_TAU, "v1"),
                               (AUTO_NO_ASYNC, "v1")]:
        e = {}
        assert select_runner(e, on_cuda=True, auto_on_v1=auto_on_v1) == \
            runner


def test_auto_keeps_v2_only_with_tau_and_async_scheduling(tmp_path):
    """The reasons ``auto`` goes to the V1 runner: a cost model without
    tau, or async scheduling turned off by the user (vLLM's synchronous
    scheduler takes the runner's full drafts and ignores the per-step
    count); vLLM's default (None) and True keep V2."""
    from types import SimpleNamespace as NS

    from vllm_jetspec.autobudget import CostModel
    from vllm_jetspec.vllm_patches.config import (AUTO_NO_ASYNC, AUTO_NO_TAU,
                                                  auto_v1_reason)

    kw = dict(ar_ms={1: 1.0}, round_ms={4: {1: 1.1}})
    CostModel(**kw).save(str(tmp_path / "old.json"))
    CostModel(**kw, tau={4: 2.0}).save(str(tmp_path / "new.json"))
    old, new = (NS(auto=True, auto_online=False,
                   cost_model=str(tmp_path / f"{n}.json"))
                for n in ("old", "new"))
    assert auto_v1_reason(old, NS(async_scheduling=None)) == AUTO_NO_TAU
    assert auto_v1_reason(new, NS(async_scheduling=False)) == AUTO_NO_ASYNC
    for a in (None, True):
        assert auto_v1_reason(new, NS(async_scheduling=a)) is None
    assert auto_v1_reason(NS(auto=False), NS(async_scheduling=False)) is None
    online = NS(auto=True, auto_online=True, cost_model=None)
    assert auto_v1_reason(online, NS(async_scheduling=None)) is None
    assert auto_v1_reason(online, NS(async_scheduling=False)) == \
        AUTO_NO_ASYNC


def test_expert_parallel_on_cpu_is_refused():
    """vLLM 0.26 CPU's fused MoE ignores the expert map: refused at start-up
    with a clear message (tensor parallelism of MoE targets works, see
    tests/test_tp.py)."""
    from types import SimpleNamespace

    from vllm_jetspec.vllm_patches.config import refuse_cpu_expert_parallel

    refuse_cpu_expert_parallel(SimpleNamespace(enable_expert_parallel=False),
                               on_cpu=True)
    with pytest.raises(ValueError, match="enable_expert_parallel is not "
                       "supported by vLLM 0.26 on CPU"):
        refuse_cpu_expert_parallel(
            SimpleNamespace(enable_expert_parallel=True), on_cpu=True)
    # Elsewhere (CUDA) expert parallelism is vLLM's business.
    refuse_cpu_expert_parallel(SimpleNamespace(enable_expert_parallel=True),
                               on_cpu=False)


def test_async_scheduling_is_turned_off_or_refused():
    """On the V1 runner (CPU, or VLLM_USE_V2_MODEL_RUNNER=0) jetspec rounds
    are synchronous: vLLM's async path there fills input ids from
    device-side linear drafts (an AssertionError in ``_prepare_input_ids``
    on the H100, 2026-11-24). Off unless asked for; asked for, one clear
    error."""
    from types import SimpleNamespace

    from vllm_jetspec.vllm_patches.config import refuse_async_scheduling

    for default in (None, False):
        args = SimpleNamespace(async_scheduling=default)
        refuse_async_scheduling(args)
        assert args.async_scheduling is False
    with pytest.raises(ValueError, match="does not support async "
                       "scheduling"):
        refuse_async_scheduling(SimpleNamespace(async_scheduling=True))


def test_gpu_engines_capture_graphs_unless_eager():
    """On a GPU a jetspec engine keeps vLLM's compile + CUDA-graph mode
    (piecewise: the tree attention runs between the pieces) unless
    enforce_eager or JETSPEC_EAGER=1 (then both the engine args and the
    already built model config say eager); on CPU nothing changes."""
    from types import SimpleNamespace

    from vllm_jetspec.vllm_patches.config import graphs_on_gpu

    def cfg():
        return (SimpleNamespace(enforce_eager=False),
                SimpleNamespace(enforce_eager=False))

    args, model = cfg()
    graphs_on_gpu(args, model, on_cpu=True, env={"JETSPEC_EAGER": "1"})
    assert not args.enforce_eager and not model.enforce_eager
    graphs_on_gpu(args, model, on_cpu=False, env={})
    assert not args.enforce_eager and not model.enforce_eager
    args, model = cfg()
    graphs_on_gpu(args, model, on_cpu=False, env={"JETSPEC_EAGER": "1"})
    assert args.enforce_eager and model.enforce_eager


def test_parse_maps_to_dflash(parse_env):
    from vllm_jetspec.vllm_patches.config import parse
    hf, head = parse_env
    spec, s = parse(dict(method="jetspec", model=head, tree_budget=32,
                         tree_width=5, tree_algo="topb_prefix"), hf)
    assert spec == dict(method="dflash", model=head,
                        num_speculative_tokens=31)
    assert (s.budget, s.width, s.algo, s.depth) == (32, 5, "topb_prefix", 7)


SLOTS = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        import vllm
        from vllm.engine.arg_utils import EngineArgs
        from vllm_jetspec.vllm_patches import apply
        apply()
        out = []
        for spec, seqs, batched in json.loads(sys.argv[2]):
            c = EngineArgs(model=sys.argv[1], skip_tokenizer_init=True,
                           dtype="float32", max_model_len=2048,
                           max_num_seqs=seqs,
                           max_num_batched_tokens=batched,
                           speculative_config=spec).create_engine_config()
            out.append(c.scheduler_config.max_num_scheduled_tokens)
        emit("scheduled", out)
""")


def test_scheduler_budget_reserves_draft_slots_of_the_depth(tmp_path):
    """vLLM keeps slots per sequence free for the draft pass
    (max_num_scheduled_tokens = max_num_batched_tokens - slots x
    max_num_seqs) and counts num_speculative_tokens - 1 for dflash, which
    for jetspec is tree_budget - 2. On the H100 bench (budget 256, 8
    sequences, 2056 batched tokens) that left the scheduler 24 tokens a
    step: trees cut to their first nodes (tau 3.94 instead of 16) and
    prefills of 24 tokens. The jetspec draft pass runs depth slots, so
    depth - 1 are kept free, as for dflash at that depth. Only the config
    is built (no engine)."""
    from models import make_tiny_target_and_head

    from vllm_jetspec.tools.engine_job import batched_tokens
    target, head = make_tiny_target_and_head(tmp_path)     # depth 7
    js = lambda b: {"method": "jetspec", "model": str(head),
                    "tree_budget": b}
    cases = [(js(256), 8, 2056), (js(128), 8, 2048), (js(4), 8, 2048),
             (js(256), 8, batched_tokens(256, 8, 7)),
             ({"method": "dflash", "model": str(head),
               "num_speculative_tokens": 7}, 8, 2048)]
    res, log = run_script(tmp_path / "slots.py", SLOTS,
                          [target, json.dumps(cases)])
    got = result(res, "scheduled", log)
    # depth 7: 6 slots per sequence; budget 4: depth 3, 2 slots; dflash
    # itself unchanged (num_speculative_tokens 7: 6 slots).
    assert got[:3] == [2056 - 8 * 6, 2048 - 8 * 6, 2048 - 8 * 2]
    # The bench's engines fit a whole tree per sequence.
    assert got[3] >= 8 * 256
    assert got[4] == 2048 - 8 * 6


# --- serving conditions ---------------------------------------------------------
# One engine per side (jetspec / no speculation) runs every scenario below with
# a KV cache of 24 blocks of 32 tokens, so long prompts preempt each other.

SCENARIOS = textwrap.dedent("""
    import json, os, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        target, cfg = sys.argv[1], json.loads(sys.argv[2])

        def body(run):
            eager = os.environ.get("JETSPEC_TEST_EAGER") != "0"
            llm = LLM(target, skip_tokenizer_init=True, dtype="float32",
                      enforce_eager=eager, gpu_memory_utilization=0.3,
                      max_model_len=512, max_num_batched_tokens=512,
                      max_num_seqs=16, block_size=32,
                      num_gpu_blocks_override=24, enable_prefix_caching=True,
                      speculative_config=run["spec"], disable_log_stats=False)
            try:
                scenarios(llm, run)
            finally:
                shutdown(llm)

        def scenarios(llm, run):
            TP = lambda p: TokensPrompt(prompt_token_ids=p)
            G = lambda **kw: SamplingParams(temperature=0, detokenize=False,
                                            **kw)
            res = {}

            # 1. Limits: max_tokens and stop tokens inside accepted branches,
            #    prompts whose generation runs into max_model_len, preemption.
            prompts, params = [], []
            for i, p in enumerate(cfg["prompts"]):
                prompts.append(TP(p))
                params.append(G(max_tokens=cfg["max_tokens"][i],
                                stop_token_ids=cfg["stop"][i] or None))
            outs = llm.generate(prompts, params, use_tqdm=False)
            res["limits"] = [(list(o.outputs[0].token_ids),
                              o.outputs[0].finish_reason) for o in outs]

            # 2. Requests jetspec cannot honour, batched with ones it can.
            fb = [G(max_tokens=24), G(max_tokens=24, repetition_penalty=1.3),
                  G(max_tokens=24, logprobs=2), G(max_tokens=24)]
            outs = llm.generate([TP(p) for p in cfg["prompts"][:4]], fb,
                                use_tqdm=False)
            res["fallback"] = [list(o.outputs[0].token_ids) for o in outs]
            lp = outs[2].outputs[0].logprobs
            res["logprobs"] = None if lp is None else [sorted(d) for d in lp]

            # 3. Aborts while other requests run.
            eng = llm.llm_engine
            ids = [f"a{i}" for i in range(4)]
            for i, p in zip(ids, cfg["prompts"][1:5]):
                eng.add_request(i, TP(p), G(max_tokens=40))
            for _ in range(3):
                eng.step()
            eng.abort_request([ids[1], ids[2]])
            done = {}
            while eng.has_unfinished_requests():
                for o in eng.step():
                    if o.finished:
                        done[o.request_id] = list(o.outputs[0].token_ids)
            res["abort"] = [done.get(ids[0]), done.get(ids[3])]

            # 4. Sampling: many seeded runs of one short prompt.
            sp = [SamplingParams(temperature=0.8, seed=s, max_tokens=4,
                                 detokenize=False)
                  for s in range(cfg["samples"])]
            outs = llm.generate([TP([1, 2, 3, 4, 5])] * len(sp), sp,
                                use_tqdm=False)
            res["samples"] = [list(o.outputs[0].token_ids) for o in outs]

            res["metrics"] = {
                x.name: getattr(x, "value", None) or getattr(x, "values", None)
                for x in llm.get_metrics()
                if x.name.startswith("vllm:spec_decode_num")
                or "preempt" in x.name}
            emit(run["key"], res)

        each_engine(json.loads(sys.argv[3]), body)
""")

SAMPLES = 1500
# The tests reading the scenario fixture's two engines run together.
SCENARIO_GROUP = pytest.mark.xdist_group("jetspec-scenarios")


@pytest.fixture(scope="module")
def scenarios(tiny, no_spec, tmp_path_factory):
    """The scenario script's results without speculation and with jetspec
    (accum_logp, budget 16)."""
    # Stop tokens that occur mid-output (so a stop falls inside a round).
    stop = [[no_spec[0][9]], [], [], [no_spec[3][14]]] + [[]] * 6
    near = [[(11 * i + 5) % 32 for i in range(n)] for n in (490, 505)]
    cfg = dict(prompts=PROMPTS + near, stop=stop, samples=SAMPLES,
               max_tokens=[64, 5, 13, 64, 31, 64, 64, 64, 64, 64])
    out = run_engines(
        tmp_path_factory.mktemp("scenarios") / "scenarios.py", SCENARIOS,
        [tiny[0], json.dumps(cfg)],
        [dict(key="no_spec", spec=None),
         dict(key="jetspec", spec={"method": "jetspec", "model": str(tiny[1]),
                                   "tree_budget": 16})],
        timeout_each=900, tail=6000)
    for name in out:
        engine_result(out, name, tail=6000)
    return out


@pytest.mark.engine
@SCENARIO_GROUP
def test_limits_stops_and_preemption_equal_no_spec(scenarios):
    a, b = scenarios["jetspec"], scenarios["no_spec"]
    assert a["limits"] == b["limits"]
    reasons = [r for _, r in b["limits"]]
    assert reasons[0] == "stop" and reasons[3] == "stop"
    assert reasons[1] == "length" and len(b["limits"][1][0]) == 5
    # The two long prompts end at max_model_len (512 tokens in all).
    assert [len(t) for t, _ in b["limits"][-2:]] == [512 - 490, 512 - 505]
    m = a["metrics"]
    assert m["vllm:spec_decode_num_accepted_tokens"] > 0
    assert any(v for k, v in m.items() if "preempt" in k), \
        "no preemption happened: the scenario would not test it"


@pytest.mark.engine
@SCENARIO_GROUP
def test_unsupported_requests_fall_back(scenarios):
    a, b = scenarios["jetspec"], scenarios["no_spec"]
    assert a["fallback"] == b["fallback"]
    assert a["logprobs"] is not None and a["logprobs"] == b["logprobs"]
    # V1 runner: batches with such a request decode plainly; V2 (CUDA):
    # such a request keeps its root token each round
    assert "decode without trees (plain decoding)" in a["log"] or \
        "keep one token per round" in a["log"]


@pytest.mark.engine
@SCENARIO_GROUP
def test_aborts_leave_other_requests_exact(scenarios):
    a, b = scenarios["jetspec"], scenarios["no_spec"]
    assert a["abort"] == b["abort"]
    assert all(x is not None and len(x) == 40 for x in a["abort"])


@pytest.mark.engine
@SCENARIO_GROUP
def test_sampling_distribution_equals_no_spec(scenarios):
    """Temperature 0.8: per position (1-3, all produced by tree verification;
    position 0 comes from the prefill) and for the pair (1, 2), jetspec's
    token distribution over 1500 seeded runs is that of no-spec
    (chi-square test of homogeneity, p > 1e-3)."""
    from collections import Counter

    from scipy.stats import chi2_contingency

    a, b = scenarios["jetspec"]["samples"], scenarios["no_spec"]["samples"]
    assert len(a) == len(b) == SAMPLES
    assert all(len(x) == 4 for x in a + b)
    m = scenarios["jetspec"]["metrics"]
    assert m["vllm:spec_decode_num_accepted_tokens"] > 0

    def table(ka, kb):
        ca, cb = Counter(ka), Counter(kb)
        keys = sorted(set(ca) | set(cb), key=str)
        big = [k for k in keys if ca[k] + cb[k] >= 20]
        rows = [[ca[k] for k in big], [cb[k] for k in big]]
        rest = [len(ka) - sum(rows[0]), len(kb) - sum(rows[1])]
        if sum(rest) >= 20:
            rows[0].append(rest[0])
            rows[1].append(rest[1])
        return rows

    checks = [([x[p] for x in a], [x[p] for x in b]) for p in (1, 2, 3)]
    checks.append(([tuple(x[1:3]) for x in a], [tuple(x[1:3]) for x in b]))
    for ka, kb in checks:
        t = table(ka, kb)
        assert len(t[0]) >= 3, "distribution too peaked for a useful test"
        p = chi2_contingency(t).pvalue
        assert p > 1e-3, (p, t)
