"""Start one jetspec engine on the Qwen3-8B shape (dummy weights) and
generate a few tokens: a start-up / capture check on the GPU.

    python scripts/gpu/one_engine.py SHAPES_DIR BUDGET MAX_NUM_SEQS [BATCH]

Prints the graph modes the runner dispatched (JETSPEC_PROFILE=1)."""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JETSPEC_PROFILE", "1")


def main(shapes: str, budget: int, seqs: int, batch: int = 1) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_jetspec.tools.engine_job import batched_tokens, graph_sizes

    t = time.perf_counter()
    llm = LLM(os.path.join(shapes, "qwen3-8b"), load_format="dummy",
              dtype="bfloat16", max_model_len=2048, max_num_seqs=seqs,
              skip_tokenizer_init=True, gpu_memory_utilization=0.85,
              max_num_batched_tokens=batched_tokens(budget, seqs, 16),
              compilation_config=dict(
                  cudagraph_capture_sizes=graph_sizes(budget, seqs)),
              speculative_config={"method": "jetspec", "tree_budget": budget,
                                  "model": os.path.join(shapes, "head-8b")})
    print(f"started in {time.perf_counter() - t:.1f} s", flush=True)
    llm.collective_rpc("jetspec_profile")
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + b) % 1000 + 10
                                              for i in range(512)])
               for b in range(batch)]
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=64,
                                                temperature=0,
                                                ignore_eos=True))
    dt = time.perf_counter() - t
    prof = llm.collective_rpc("jetspec_profile")[0]
    print(f"generated {sum(len(o.outputs[0].token_ids) for o in outs)} "
          f"tokens in {dt:.2f} s; graph modes {prof.get('graph_modes')}; "
          f"steps {prof.get('steps')}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
         *(int(x) for x in sys.argv[4:5]))
