"""The torch tree-attention backend for vLLM's CPU platform: unit checks of
its cache layout and tree masks, and the real engine with it (target and
DFlash draft attention) against stock CPU_ATTN."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from engine_io import result, run_script
from models import make_tiny_qwen3
from vllm_jetspec.kernels.tree_attention_ref import tree_attention_ref
from vllm_jetspec.tree import build_tree, packed_ancestor_mask


def test_backend_writes_and_attends_like_the_reference():
    from vllm_jetspec.vllm_patches import tree_state
    from vllm_jetspec.vllm_patches.torch_attention import (
        TorchTreeAttentionBackend, TorchTreeAttentionImpl,
        TorchTreeAttentionMetadata)

    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs = 4, 2, 16, 16
    R, prefix = 2, torch.tensor([5, 20])
    v, i = torch.randn(R, 4, 30, generator=g).log_softmax(-1).topk(3, -1)
    tree = build_tree(v, i, torch.zeros(R, dtype=torch.long), 9,
                      algo="topb_prefix")
    n = tree.num_nodes
    seq = prefix + n
    shape = TorchTreeAttentionBackend.get_kv_cache_shape(8, bs, hkv, d)
    kv = torch.zeros(shape)
    block_table = torch.tensor([[3, 1], [6, 2]], dtype=torch.int32)
    # Prefix K/V written first (as earlier steps would have), then the
    # tree's tokens by the forward itself.
    impl = TorchTreeAttentionImpl(hq, d, d ** -0.5, hkv, None, None, "auto")
    def slots(r, lo, hi):
        p = torch.arange(lo, hi)
        return (block_table[r, p // bs].long() * bs + p % bs)
    for r in range(R):
        p = int(prefix[r])
        impl.do_kv_cache_update(None, torch.randn(p, hkv, d, generator=g),
                                torch.randn(p, hkv, d, generator=g), kv,
                                slots(r, 0, p))
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)])
    T = int(qsl[-1])
    q = torch.randn(T, hq, d, generator=g)
    k = torch.randn(T, hkv, d, generator=g)
    val = torch.randn(T, hkv, d, generator=g)
    slot_mapping = torch.cat([slots(r, int(prefix[r]), int(seq[r]))
                              for r in range(R)])
    packed = packed_ancestor_mask(tree)
    tree_state.set_step_masks({r: packed[r, :int(n[r])] for r in range(R)})
    try:
        meta = TorchTreeAttentionMetadata(
            num_actual_tokens=T, query_start_loc=qsl.int(),
            seq_lens=seq.int(), block_table=block_table,
            slot_mapping=slot_mapping, causal=True,
            tree_masks=tree_state.masks_for_step(R))
    finally:
        tree_state.clear()
    out = torch.empty(T, hq * d)
    impl.forward(None, q, k, val, kv, meta, out)
    # The cache now holds the tree tokens at their slots, K and V apart.
    kf = kv[:, 0].reshape(-1, hkv, d)
    assert torch.equal(kf[slot_mapping], k)
    assert torch.equal(kv[:, 1].reshape(-1, hkv, d)[slot_mapping], val)
    ref = tree_attention_ref(q, kv[:, 0], kv[:, 1], block_table, prefix, qsl,
                             packed, d ** -0.5)
    torch.testing.assert_close(out.view(T, hq, d), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_mixed_step_matches_attend_one(dtype):
    """One step with every kind of request the backend plans for: a tree
    (packed ancestor rows), a chunked prefill after a cached prefix, a
    first prefill, a single decode token; then the same requests in a
    non-causal step (the draft pass). Compared with ``attend_one``."""
    from vllm_jetspec.kernels.tree_attention_ref import (attend_one,
                                                         paged_gather)
    from vllm_jetspec.vllm_patches.torch_attention import (
        TorchTreeAttentionBackend, TorchTreeAttentionImpl,
        TorchTreeAttentionMetadata)

    g = torch.Generator().manual_seed(1)
    hq, hkv, d, bs = 6, 2, 32, 16
    v, i = torch.randn(1, 5, 40, generator=g).log_softmax(-1).topk(3, -1)
    tree = build_tree(v, i, torch.zeros(1, dtype=torch.long), 12,
                      algo="accum_logp")
    words = packed_ancestor_mask(tree)[0, :int(tree.num_nodes[0])]
    prefix = [37, 21, 0, 50]
    n = [int(tree.num_nodes[0]), 9, 13, 1]
    seq = [p + k for p, k in zip(prefix, n)]
    shape = TorchTreeAttentionBackend.get_kv_cache_shape(24, bs, hkv, d)
    block_table = torch.tensor([[3, 9, 17, 0], [1, 2, 0, 0],
                                [5, 0, 0, 0], [20, 11, 7, 4]],
                               dtype=torch.int32)
    impl = TorchTreeAttentionImpl(hq, d, d ** -0.5, hkv, None, None, "auto")

    def slots(r, lo, hi):
        p = torch.arange(lo, hi)
        return block_table[r, p // bs].long() * bs + p % bs

    for causal in (True, False):
        kv = torch.zeros(shape, dtype=dtype)
        for r in range(4):
            impl.do_kv_cache_update(
                None, torch.randn(prefix[r], hkv, d, generator=g),
                torch.randn(prefix[r], hkv, d, generator=g), kv,
                slots(r, 0, prefix[r]))
        T = sum(n)
        qsl = torch.tensor([0] + n).cumsum(0).int()
        q = torch.randn(T, hq, d, generator=g).to(dtype)
        k = torch.randn(T, hkv, d, generator=g).to(dtype)
        val = torch.randn(T, hkv, d, generator=g).to(dtype)
        # Two padding rows (slot -1) after the real tokens.
        pad = lambda x: torch.cat([x, torch.zeros(2, *x.shape[1:],
                                                  dtype=x.dtype)])
        slot_mapping = torch.cat([slots(r, prefix[r], seq[r])
                                  for r in range(4)] + [torch.tensor([-1, -1])])
        meta = TorchTreeAttentionMetadata(
            num_actual_tokens=T + 2, query_start_loc=qsl,
            seq_lens=torch.tensor(seq, dtype=torch.int32),
            block_table=block_table, slot_mapping=slot_mapping,
            causal=causal, tree_masks={0: words} if causal else {})
        out = torch.zeros(T + 2, hq * d, dtype=dtype)
        impl.forward(None, pad(q), pad(k), pad(val), kv, meta, out)
        assert not out[T:].any()
        for r in range(4):
            s, e = int(qsl[r]), int(qsl[r + 1])
            kk = paged_gather(kv[:, 0], block_table, r, seq[r])
            vv = paged_gather(kv[:, 1], block_table, r, seq[r])
            assert torch.equal(kk[prefix[r]:], k[s:e])
            assert torch.equal(vv[prefix[r]:], val[s:e])
            ref = attend_one(q[s:e], kk, vv, prefix[r],
                             words if causal and r == 0 else None,
                             d ** -0.5, causal=causal)
            # Both compute in fp32 and round to the cache's dtype once.
            torch.testing.assert_close(out[s:e].view(-1, hq, d), ref)


RUN = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        spec = json.loads(sys.argv[2])
        llm = LLM(sys.argv[1], skip_tokenizer_init=True, dtype="float32",
                  enforce_eager=True, gpu_memory_utilization=0.3,
                  max_model_len=512, max_num_batched_tokens=128,
                  max_num_seqs=8, enable_prefix_caching=True,
                  speculative_config=spec)
        prompts = [list(range(1, 1 + n)) for n in (3, 40, 100, 7)]
        prompts.append([5, 6, 7] * 30)
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            SamplingParams(max_tokens=24, temperature=0, detokenize=False))
        emit("result", [list(o.outputs[0].token_ids) for o in outs])
""")


def run_engine(tmp_path, model, spec, env_extra):
    res, log = run_script(tmp_path / "run.py", RUN,
                          [model, json.dumps(spec)], env=env_extra,
                          tail=4000)
    return result(res, "result", log, tail=4000), log


@pytest.mark.engine
def test_engine_with_torch_attention_equals_cpu_attn(tmp_path):
    """Chunked prefill (128-token budget), prefix caching, a batch of mixed
    lengths, and DFlash drafting on top: the torch backend serves both the
    target and the draft model and the greedy tokens are CPU_ATTN's."""
    from vllm_jetspec.head import HeadConfig, random_head, save_head

    model = make_tiny_qwen3(tmp_path / "tiny-qwen3")
    hc = HeadConfig.for_target(model, num_layers=1, target_layer_ids=[0],
                               block_size=8)
    save_head(random_head(hc, seed=0), hc, tmp_path / "head")
    ref, _ = run_engine(tmp_path, model, None, {})
    spec = {"method": "dflash", "model": str(tmp_path / "head"),
            "num_speculative_tokens": 7}
    got, log = run_engine(tmp_path, model, spec,
                          {"JETSPEC_TORCH_ATTENTION": "1"})
    assert "jetspec torch attention backend in use" in log
    assert got == ref
