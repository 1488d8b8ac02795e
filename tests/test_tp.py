"""jetspec under vLLM's tensor parallelism on CPU (2 ranks on 2 cores): the
greedy output at TP=2 equals the same engine's output without speculation
at TP=2, for mixed prompts at batch 4, with a dense and with a MoE target.
The drafter replays the recorded no-spec output (``"replay"``), so every
round accepts a deep branch (τ = depth + 1): acceptance, KV compaction on each rank's shard and the next
draft's context are all exercised; both ranks build their trees from the
same (gathered) logits and must take the same decisions, or the ranks'
caches and tokens would diverge."""

from __future__ import annotations

import json
import textwrap

import pytest

from engine_io import result, run_script
from models import make_tiny_target_and_head

RUN = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        llm = LLM(sys.argv[1], skip_tokenizer_init=True, dtype="float32",
                  enforce_eager=True, max_model_len=512, max_num_seqs=4,
                  gpu_memory_utilization=0.1, tensor_parallel_size=2,
                  distributed_executor_backend="mp",
                  speculative_config=json.loads(sys.argv[2]),
                  disable_log_stats=False)
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in json.loads(sys.argv[3])],
            SamplingParams(max_tokens=32, temperature=0, detokenize=False))
        emit("result", [list(o.outputs[0].token_ids) for o in outs])
        emit("metrics", {
            x.name: x.value for x in llm.get_metrics() if x.name in (
                "vllm:spec_decode_num_drafts",
                "vllm:spec_decode_num_accepted_tokens")})
""")

PROMPTS = [[(7 * i + 3) % 500 for i in range(n)] for n in (3, 40, 100, 7)]


def run_tp2(tmp_path, target, spec):
    # vLLM's CPU workers bind OpenMP threads per NUMA node by default, and
    # this machine has one: bind rank 0 to core 0 and rank 1 to core 1.
    res, log = run_script(tmp_path / "run_tp.py", RUN,
                          [target, json.dumps(spec), json.dumps(PROMPTS)],
                          env=dict(VLLM_CPU_OMP_THREADS_BIND="0|1"))
    return result(res, "result", log), result(res, "metrics", log)


# A rank per core: run alone (see conftest.py).
@pytest.mark.exclusive
@pytest.mark.engine
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_tp2_greedy_equals_no_spec(tmp_path, moe):
    """Dense Qwen3 and Qwen3-MoE (8 experts, top-2; experts sharded by TP:
    vLLM 0.26's CPU MoE has no expert parallelism, see
    ``refuse_cpu_expert_parallel``)."""
    from vllm_jetspec.replay import save_replay

    target, head = make_tiny_target_and_head(tmp_path, moe=moe)   # depth 7
    no_spec, _ = run_tp2(tmp_path, target, None)
    save_replay(str(tmp_path / "replay.json"), PROMPTS, no_spec)
    tokens, m = run_tp2(tmp_path, target, {
        "method": "jetspec", "model": str(head),
        "tree_budget": 16, "replay": str(tmp_path / "replay.json")})
    assert tokens == no_spec
    # Every round accepts the whole replayed branch: 7 drafts per round.
    drafts = m["vllm:spec_decode_num_drafts"]
    assert drafts > 0
    assert m["vllm:spec_decode_num_accepted_tokens"] == 7 * drafts
