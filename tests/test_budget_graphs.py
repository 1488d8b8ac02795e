"""Full CUDA graphs per candidate budget of a ``tree_budget: "auto"``
engine (``vllm_patches.budget_graphs``), checked on vLLM 0.26's own
dispatcher and runner methods, on a stand-in runner (no engine, no GPU: the
key sets, the padding and the dispatch are host logic; the captures
themselves only run on CUDA)."""

from __future__ import annotations

import types

import numpy as np
import pytest

pytest.importorskip("vllm")

from vllm.config import (CompilationConfig, CompilationMode,  # noqa: E402
                         CUDAGraphMode)
from vllm.v1.attention.backend import AttentionCGSupport  # noqa: E402
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402

from vllm_jetspec.tools.engine_job import auto_graph_sizes, graph_sizes  # noqa: E402
from vllm_jetspec.vllm_patches import budget_graphs  # noqa: E402
from vllm_jetspec.vllm_patches.budget_graphs import (  # noqa: E402
    padded_uniform, uniform_sizes)

FULL, PIECEWISE = CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE

# What the plugin does in every engine process (vllm_patches.apply), before
# the stand-in runner below takes vLLM's (wrapped) methods.
budget_graphs.apply()


def test_uniform_sizes_name_one_length_per_key():
    sizes = auto_graph_sizes([4, 16, 64], 8)
    per = uniform_sizes(sizes, [1, 4, 16, 64], 8, max(sizes))
    keys = [(x, x // u) for u, xs in per.items() for x in xs]
    assert len(keys) == len(set(keys))          # (tokens, requests) -> u
    for u, xs in per.items():
        assert xs == sorted(xs) and all(x % u == 0 for x in xs)
        assert xs[0] == u and xs[-1] == 8 * u   # 1 to 8 requests
        for B in range(1, 9):                   # every batch has a graph
            x = padded_uniform(xs, B * u)
            assert x is not None and B <= x // u <= 8
    assert padded_uniform([4, 8], 9) is None
    # capped at the largest capture size
    assert uniform_sizes([64, 128, 256], [64], 8, 128) == {64: [64, 128]}


class _Builder:
    @classmethod
    def get_cudagraph_support(cls, vllm_config, spec):
        return AttentionCGSupport.UNIFORM_BATCH


class _Backend:
    __name__ = "stand-in"

    @staticmethod
    def get_builder_cls():
        return _Builder


class _Runner:
    """The attributes vLLM's methods below read, no more."""
    _check_and_update_cudagraph_mode = \
        GPUModelRunner._check_and_update_cudagraph_mode
    _determine_batch_execution_and_padding = \
        GPUModelRunner._determine_batch_execution_and_padding
    _warmup_and_capture = GPUModelRunner._warmup_and_capture
    _is_uniform_decode = staticmethod(GPUModelRunner._is_uniform_decode)

    def __init__(self, sizes, budget, max_seqs):
        ns = types.SimpleNamespace
        cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                               cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE,
                               cudagraph_capture_sizes=list(sizes),
                               max_cudagraph_capture_size=max(sizes),
                               splitting_ops=list(
                                   CompilationConfig._attention_ops))
        self.compilation_config = cc
        self.scheduler_config = ns(max_num_seqs=max_seqs)
        self.vllm_config = ns(
            compilation_config=cc, num_speculative_tokens=budget - 1,
            scheduler_config=self.scheduler_config, lora_config=None,
            parallel_config=ns(data_parallel_size=1),
            observability_config=ns(cudagraph_metrics=False))
        self.parallel_config = ns(tensor_parallel_size=1)
        self.model_config = ns(is_encoder_decoder=False)
        self.input_batch = ns(lora_id_to_lora_request={})
        self.kv_cache_config = None
        self.max_num_reqs = max_seqs
        self.speculative_config = None
        self.uniform_decode_query_len = budget
        self.cudagraph_dispatcher = CudagraphDispatcher(self.vllm_config)

    def _pad_for_sequence_parallelism(self, n):
        return n

    def init_keys(self):
        self._check_and_update_cudagraph_mode(
            [{_Backend}], [types.SimpleNamespace(kv_cache_spec=None)])

    def dispatch(self, counts):
        counts = np.array(counts, dtype=np.int32)
        mode, desc, *_ = self._determine_batch_execution_and_padding(
            num_tokens=int(counts.sum()), num_reqs=len(counts),
            num_scheduled_tokens_np=counts,
            max_num_scheduled_tokens=int(counts.max()),
            use_cascade_attn=False)
        return mode, desc


def test_static_engine_keeps_vllms_keys():
    """Without the auto lengths, vLLM's behaviour: sizes rounded to
    multiples of the budget, full graphs only for whole-budget steps."""
    r = _Runner(auto_graph_sizes([4, 16, 64], 8), 64, 8)
    r.init_keys()
    cc = r.compilation_config
    assert all(x % 64 == 0 for x in cc.cudagraph_capture_sizes)
    assert r.dispatch([64] * 3)[0] == FULL
    assert r.dispatch([16] * 4)[0] == PIECEWISE
    assert r.uniform_decode_query_len == 64


def test_auto_engine_full_graph_for_every_candidate():
    budgets, seqs = [4, 16, 64], 8
    r = _Runner(auto_graph_sizes(budgets, seqs), 64, seqs)
    budget_graphs.enable(r, [1, *budgets])
    r.init_keys()
    d = r.cudagraph_dispatcher
    assert r.compilation_config.cudagraph_capture_sizes == \
        auto_graph_sizes(budgets, seqs)          # not rounded
    full = d.cudagraph_keys[FULL]
    assert {k.num_tokens // k.num_reqs for k in full} == {1, 4, 16, 64}
    assert all(k.uniform and k.num_tokens % k.num_reqs == 0 for k in full)
    for u in (1, 4, 16, 64):
        for B in range(1, seqs + 1):
            mode, desc = r.dispatch([u] * B)
            assert mode == FULL, (u, B)
            assert desc.num_tokens == desc.num_reqs * u
            assert B <= desc.num_reqs <= seqs and desc in full
    # restored after each step
    assert r.uniform_decode_query_len == 64 == d.uniform_decode_query_len
    # not uniform (a cut tree, a prefill, a length outside the set): the
    # mixed graphs
    assert r.dispatch([16, 16, 9])[0] == PIECEWISE
    assert r.dispatch([16, 5])[0] == PIECEWISE
    assert r.dispatch([8, 8])[0] == PIECEWISE
    # keys survive vLLM's reset after its memory profile
    for s in d.cudagraph_keys.values():
        s.clear()
    d.keys_initialized = False
    r.init_keys()
    assert d.cudagraph_keys[FULL] == full


def test_capture_runs_each_key_at_its_length():
    budgets, seqs = [4, 16], 4
    r = _Runner(auto_graph_sizes(budgets, seqs), 16, seqs)
    budget_graphs.enable(r, [1, *budgets])
    r.init_keys()
    d = r.cudagraph_dispatcher
    seen = []

    def capture(self, desc, cudagraph_runtime_mode):
        # what vLLM's _dummy_run does with the descriptor
        u = self.uniform_decode_query_len
        assert d.uniform_decode_query_len == u
        if desc.uniform:
            n = min(seqs, -(-desc.num_tokens // u))
            counts = np.full(n, u, dtype=np.int32)
        else:
            n = min(desc.num_tokens, seqs)
            counts = np.full(n, desc.num_tokens // n, dtype=np.int32)
            counts[-1] += desc.num_tokens % n
        mode, got, *_ = self._determine_batch_execution_and_padding(
            num_tokens=desc.num_tokens, num_reqs=n,
            num_scheduled_tokens_np=counts,
            max_num_scheduled_tokens=u if desc.uniform else desc.num_tokens,
            use_cascade_attn=False, force_uniform_decode=desc.uniform)
        assert (mode, got) == (cudagraph_runtime_mode, desc)
        seen.append(desc)

    wrapped = budget_graphs.wrap_warmup_and_capture(capture)
    for mode, descs in d.get_capture_descs():
        for desc in descs:
            wrapped(r, desc, cudagraph_runtime_mode=mode)
    assert set(seen) >= d.cudagraph_keys[FULL]
    assert r.uniform_decode_query_len == 16


def test_graph_sizes_of_auto_cover_each_budget():
    assert auto_graph_sizes([16], 8) == sorted(
        set(graph_sizes(1, 8)) | set(graph_sizes(16, 8)))
