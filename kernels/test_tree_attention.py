"""The Triton tree-attention kernel equals the torch reference.

Fresh random inputs for every case, the output poisoned (NaN) before each
run, scattered pages, mixed prefixes (0, inside a page, across pages),
budgets 1-256, GQA groups 1/3/4, head dims 32/64/128, strided cache views.
Without a GPU the kernel runs in Triton's interpreter on CPU (fp32); on a
GPU also bf16 and fp16 (error within bf16/fp16 norms of the fp32 reference).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before Triton is first imported: the repository's
    # conftest.py does that for pytest runs; this covers direct imports.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(tl.max, InterpretedFunction):
        raise RuntimeError(
            "Triton was imported before TRITON_INTERPRET=1 was set, so its "
            "standard library is compiled for a GPU and the kernel cannot "
            "run on CPU; run pytest from the repository root (its "
            "conftest.py sets the variable) or export TRITON_INTERPRET=1")

from vllm_jetspec.kernels.tree_attention import tree_attention  # noqa: E402
from vllm_jetspec.kernels.tree_attention_ref import (  # noqa: E402
    tree_attention_ref)
from vllm_jetspec.tree import build_tree, packed_ancestor_mask  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16]
                            if DEV == "cuda" else [])
# No shared fixtures: each test is scheduled on its own (root conftest.py).
pytestmark = pytest.mark.independent
# The tests marked slow take minutes in Triton's interpreter (CPU): the
# quick loop leaves them out.


def make_case(seed, budgets, hq, hkv, D, prefixes, block_size=16,
              dtype=torch.float32, layout="split"):
    g = torch.Generator().manual_seed(seed)
    R = len(budgets)
    trees = []
    for r, b in enumerate(budgets):
        depth = 16
        logp = torch.randn(1, depth, 97, generator=g).log_softmax(-1)
        v, i = logp.topk(16, dim=-1)
        trees.append(build_tree(v, i, torch.zeros(1, dtype=torch.long), b,
                                algo="accum_logp", width=16))
    n = torch.tensor([int(t.num_nodes[0]) for t in trees])
    N = int(n.max())
    W = (N + 63) // 64
    mask = torch.zeros(R, N, W, dtype=torch.long)
    for r, t in enumerate(trees):
        m = packed_ancestor_mask(t)[0]
        mask[r, :m.shape[0], :m.shape[1]] = m[:N]
    prefix = torch.tensor(prefixes)
    lengths = prefix + n
    max_blocks = int((lengths.max() + block_size - 1) // block_size)
    num_blocks = R * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)[:R * max_blocks]
    block_table = perm.view(R, max_blocks).int()
    if layout == "split":
        k = torch.randn(num_blocks, block_size, hkv, D, generator=g)
        v = torch.randn(num_blocks, block_size, hkv, D, generator=g)
    else:  # one [blocks, 2, block_size, H, D] cache, strided views
        kv = torch.randn(num_blocks, 2, block_size, hkv, D, generator=g)
        k, v = kv[:, 0], kv[:, 1]
    q = torch.randn(int(n.sum()), hq, D, generator=g)
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)]).int()
    to = dict(device=DEV)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to),
            v.to(dtype=dtype, **to), block_table.to(**to),
            prefix.int().to(**to), qsl.to(**to), mask.to(**to), D ** -0.5)


def check(args, dtype, **kw):
    q, k, v, bt, prefix, qsl, mask, scale = args
    want = tree_attention_ref(q.float(), k.float(), v.float(), bt.long(),
                              prefix.long(), qsl.long(), mask, scale)
    out = torch.full_like(q, float("nan"))
    got = tree_attention(q, k, v, bt, prefix, qsl, mask, scale, out=out,
                         **kw)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any()
    err = (got.float() - want).abs().max().item()
    if dtype == torch.float32:
        assert err < 2e-4, err
    else:
        # Inputs rounded to 8 (bf16) / 11 (fp16) mantissa bits: relative
        # to the output's scale.
        tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
        assert err <= tol * max(1.0, want.abs().max().item()), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (8, 2)])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_matches_reference_mixed_batch(dtype, hq, hkv, D):
    seed = hq * 1000 + D + DTYPES.index(dtype)
    # Four requests: budgets 1, 7, 64, 130; prefixes 0, inside a page,
    # across several pages, and a page boundary.
    args = make_case(seed, [1, 7, 64, 130], hq, hkv, D, [0, 5, 37, 16],
                     dtype=dtype)
    check(args, dtype)


@pytest.mark.parametrize("budget", [2, 16, 128, 256])
def test_every_budget_and_strided_cache(budget):
    args = make_case(budget, [budget, max(2, budget // 3)], 8, 2, 64,
                     [70, 3], layout="fused")
    check(args, torch.float32)


def test_single_node_trees_are_plain_decode():
    """Budget 1 everywhere (no drafts): one query per request attending to
    its prefix and itself, i.e. an ordinary decode step."""
    args = make_case(7, [1, 1, 1], 4, 2, 64, [1, 40, 100])
    check(args, torch.float32)


def test_fresh_inputs_every_call():
    """Two calls with different inputs give different, each correct,
    outputs (nothing is cached between launches)."""
    a = make_case(11, [16, 9], 4, 4, 64, [20, 8])
    b = make_case(12, [16, 9], 4, 4, 64, [20, 8])
    check(a, torch.float32)
    check(b, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [3, "auto"])
@pytest.mark.parametrize("hq,hkv,D", [(9, 3, 64), (8, 2, 128)])
def test_split_prefix_matches_reference(dtype, splits, hq, hkv, D):
    """The prefix split across programs (flash-decoding) with a combine
    pass. Given splits: prefixes 0 (every prefix split empty), shorter than
    one split, and spanning several; trees of 1-130 nodes. "auto": one
    request with a small tree (a small grid, so it does split)."""
    seed = 500 + hq + D + DTYPES.index(dtype) + (7 if splits == "auto"
                                                   else splits)
    if splits == "auto":
        args = make_case(seed, [16], hq, hkv, D, [700], dtype=dtype,
                         layout="fused")
    else:
        args = make_case(seed, [1, 7, 64, 130], hq, hkv, D,
                         [0, 5, 300, 700], dtype=dtype, layout="fused")
    check(args, dtype, num_splits=splits)
    check(args, dtype, num_splits=splits, max_prefix=700)


@pytest.mark.parametrize("splits", [2, 9, "auto"])
def test_split_launch_independent_of_prefixes(splits):
    """What a CUDA graph replays: a launch sized from a bound of the
    prefixes (the model's length), not from them. Each request divides its
    own prefix: one far shorter than the bound leaves most splits empty
    (they write only m = -inf and the combine skips them), one longer than
    splits x the minimum keys gets longer splits; prefixes 0 and 1 keep
    only the tree's split."""
    args = make_case(1300 + (0 if splits == "auto" else splits),
                     [16, 5, 40, 1], 8, 2, 64, [0, 1, 130, 1000],
                     layout="fused")
    check(args, torch.float32, num_splits=splits, max_prefix=8192)
    # The same launch (same split count) on other prefixes and trees.
    again = make_case(1400, [3, 16, 1, 33], 8, 2, 64, [700, 2, 64, 129],
                      layout="fused")
    check(again, torch.float32, num_splits=splits, max_prefix=8192)


def test_choose_splits():
    from vllm_jetspec.kernels.tree_attention import choose_splits

    # A full grid: no split. Batch 1, budget 16, 8 KV heads on 132 SMs:
    # 8 programs -> 33 splits if the prefix has room for them.
    assert choose_splits(300, 8192, 64, 132) == 1
    assert choose_splits(8, 8192, 64, 132) == 33
    # Each split has room for at least two key blocks (min_blocks).
    assert choose_splits(8, 512, 64, 132) == 4
    assert choose_splits(8, 100, 64, 132) == 1
    assert choose_splits(8, 512, 64, 132, min_blocks=1) == 8


def test_tile_config():
    from vllm_jetspec.kernels.tree_attention import tile_config

    # Qwen3-8B shape (group 4, head dim 128): decode steps and trees of up
    # to 31 nodes take the small tile (16 nodes x 4 heads = 64 rows: a
    # whole budget-16 tree), larger trees and prefills 32 nodes x 4 heads =
    # 128 rows with 8 warps (budget 128 reads each prefix 4 times, not 16);
    # 64 keys a step.
    assert tile_config(1, 4, 128) == (16, 64, 64, 4)
    assert tile_config(16, 4, 128) == (16, 64, 64, 4)
    assert tile_config(31, 4, 128) == (16, 64, 64, 4)
    assert tile_config(32, 4, 128) == (32, 128, 64, 8)
    assert tile_config(512, 4, 128) == (32, 128, 64, 8)
    # Without large tiles: the small one for every launch.
    assert tile_config(512, 4, 128, large=False) == (16, 64, 64, 4)
    # SmolLM2 (group 3, head dim 64): 21 nodes in 64 rows, 42 in 128.
    assert tile_config(16, 3, 64) == (21, 64, 64, 4)
    assert tile_config(64, 3, 64) == (42, 128, 64, 8)
    # Head dim 256: half the rows and keys.
    assert tile_config(1, 4, 256) == (8, 32, 32, 4)
    assert tile_config(64, 4, 256) == (16, 64, 32, 8)
    # Only two variants per (group, head dim): compilations stay few.
    for group, D in [(1, 64), (3, 64), (4, 128), (8, 128), (16, 64),
                     (4, 256)]:
        assert len({tile_config(n, group, D) for n in range(1, 300)}) == 2
        for n in range(1, 300):
            nodes, rows, block_n, _ = tile_config(n, group, D)
            assert rows >= nodes * group and rows >= 16
            assert rows & (rows - 1) == 0 and 64 % block_n == 0


def test_precision():
    """fp32 dot products in IEEE fp32 by default; ``tf32`` (vLLM's own
    choice for fp32 attention) within TF32's 10-bit mantissa on a GPU;
    anything else refused."""
    args = make_case(77, [1, 16, 40], 8, 2, 64, [0, 37, 300])
    check(args, torch.float32, precision="ieee")
    q, k, v, bt, prefix, qsl, mask, scale = args
    want = tree_attention_ref(q, k, v, bt.long(), prefix.long(), qsl.long(),
                              mask, scale)
    got = tree_attention(q, k, v, bt, prefix, qsl, mask, scale,
                         precision="tf32")
    # TF32 rounds inputs to 10 mantissa bits (2^-11 relative); the
    # interpreter on CPU computes in fp32.
    tol = 5e-3 if DEV == "cuda" else 2e-4
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err
    with pytest.raises(ValueError, match="precision"):
        tree_attention(q, k, v, bt, prefix, qsl, mask, scale,
                       precision="fp64")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("large", [True, False])
@pytest.mark.parametrize("hq,hkv,D", [(9, 3, 64), (8, 2, 128), (4, 4, 32)])
def test_tiles_match_reference(dtype, splits, large, hq, hkv, D):
    """128-row programs (large trees, long chunks; the default) and 64-row
    programs for every launch (``large_tiles=False``): trees of 1-256 nodes
    (several tiles per request), prefixes across pages, with and without
    the split-prefix pass."""
    seed = 900 + hq + D + DTYPES.index(dtype) + splits + 7 * large
    args = make_case(seed, [1, 40, 130, 256], hq, hkv, D, [0, 5, 300, 64],
                     dtype=dtype, layout="fused")
    check(args, dtype, large_tiles=large, num_splits=splits)


@pytest.mark.slow
@pytest.mark.parametrize("tile", [(4, 16, 4, 2), (16, 64, 8, 3), (1, 32, 2, 1)])
def test_tile_override_matches_reference(tile):
    """A tuning run's explicit tile (nodes, keys per step, warps, stages)
    gives the same attention; bad tiles are refused."""
    dtype = DTYPES[-1]
    args = make_case(1200 + tile[0], [1, 40, 130], 8, 2, 64, [0, 37, 300],
                     dtype=dtype)
    check(args, dtype, tile=tile)
    check(args, dtype, tile=tile, num_splits=2)
    with pytest.raises(ValueError, match="tile"):
        tree_attention(*args, tile=(4, 48, 4, 2))


def _spec(name, value, dns):
    """What Triton keys a compiled variant on for one (non-constexpr)
    argument: its own specialisation function, as its launcher's binder
    calls it (type; a tensor's 16-byte alignment, an int's == 1 and
    divisibility by 16; nothing where not specialised)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    return name, native_specialize_impl(BaseBackend, value, False,
                                        name not in dns, True)


class _Recorder:
    """Stands for one of the module's Triton kernels: records the
    specialisation key of every launch and every ``warmup``."""

    def __init__(self, name, kernel, log):
        self.name, self.log = name, log
        self.names = list(kernel.arg_names)
        from vllm_jetspec.kernels.tree_attention import DO_NOT_SPECIALIZE
        self.dns = set(DO_NOT_SPECIALIZE[name])
        import inspect
        self.constexprs = {
            n for n, p in inspect.signature(kernel.fn).parameters.items()
            if "constexpr" in str(p.annotation)}

    def key(self, args, kwargs):
        bound = dict(zip(self.names, args))
        bound.update((n, v) for n, v in kwargs.items() if n in self.names)
        specs = tuple((n, bound[n]) if n in self.constexprs
                      else _spec(n, bound[n], self.dns) for n in self.names)
        options = tuple(sorted((n, v) for n, v in kwargs.items()
                               if n not in self.names))
        return self.name, specs, options

    def __getitem__(self, grid):
        return lambda *a, **k: self.log["launch"].append(self.key(a, k))

    def warmup(self, *args, grid, **kwargs):
        self.log["warm"].append(self.key(args, kwargs))


def _engine_like_steps(hq, hkv, D, dtype):
    """Tensors laid out as the engine's are, step after step: one KV cache
    ([blocks, 2, page, H, D], per-layer views), persistent query/output,
    block-table and metadata buffers used through leading slices, the
    builder's mask and tree-flag buffers (chains flagged 0: the prefills
    and decode steps). Steps: vLLM's warm-up (a 17-token
    prefill per request), a budget-16 verify, a 200-token prefill, a
    100-token chunk after a 300-token prefix, four trees over long
    prefixes, decode steps, single trees over a 700-token prefix. A
    generator: a step's metadata is valid until the next step is made."""
    g = torch.Generator().manual_seed(3)
    to = dict(device=DEV)
    page, pages = 16, 48
    kv = torch.randn(pages * 8 + 1, 2, page, hkv, D, generator=g).to(
        dtype=dtype, **to)
    bt_buf = torch.stack([torch.randperm(pages * 8, generator=g)[:pages]
                          for _ in range(8)]).int().to(**to)
    q_buf = torch.randn(1024, hq, D, generator=g).to(dtype=dtype, **to)
    out_buf = torch.empty_like(q_buf)
    pre_buf = torch.zeros(8, dtype=torch.int32, **to)
    qsl_buf = torch.zeros(9, dtype=torch.int32, **to)
    masks_buf = torch.full((8, 64, 1), -1, dtype=torch.long, **to)
    tree_buf = torch.zeros(8, dtype=torch.int32, **to)
    steps = [([17] * 4, [0] * 4), ([16], [17]), ([200], [0]),
             ([100], [300]), ([16] * 4, [500, 20, 300, 600]),
             ([1] * 6, [40, 1, 700, 3, 90, 16]),
             # one request over a long prefix: a small grid, so "auto"
             # splits it, with either tile
             ([16], [700]), ([32], [700]), ([43], [700])]
    for nodes, prefixes in steps:
        R, T, N = len(nodes), sum(nodes), max(nodes)
        pre_buf[:R] = torch.tensor(prefixes, dtype=torch.int32)
        qsl_buf[:R + 1] = torch.tensor([0, *nodes], dtype=torch.int32
                                       ).cumsum(0)
        tree_buf[:R] = int(1 < N <= 64 and 0 not in prefixes)
        yield dict(q=q_buf[:T], k_cache=kv[:, 0], v_cache=kv[:, 1],
                   block_table=bt_buf[:R], prefix_lens=pre_buf[:R],
                   query_start_loc=qsl_buf[:R + 1],
                   tree_mask=masks_buf[:R], tree_rows=tree_buf[:R],
                   scale=D ** -0.5, out=out_buf[:T]), N, max(prefixes)


@pytest.mark.parametrize("settings", [
    dict(num_splits="auto", large_tiles=True),
    dict(num_splits=4, large_tiles=True),
    dict(num_splits=1, large_tiles=False)])
@pytest.mark.parametrize("hq,hkv,D", [(9, 3, 64), (32, 8, 128)])
def test_precompile_covers_every_launch(monkeypatch, settings, hq, hkv, D):
    """``precompile`` on the tensors of the engine's first attention call
    (vLLM's warm-up step) compiles every variant the engine's later steps
    launch -- prefills past the small tile, split prefixes, decode steps
    -- so none compiles inside a served step (vLLM's JIT monitor, H200
    2026-12-05: the first prompt compiled the large tile). Checked on
    Triton's specialisation keys (kernels replaced by recorders; any
    device) and, on a GPU, on Triton's own cache: no entry added by the
    launches after ``precompile``."""
    import vllm_jetspec.kernels.tree_attention as ta

    dtype = DTYPES[-1]
    log = {"launch": [], "warm": []}
    real = {n: getattr(ta, n) for n in ta.DO_NOT_SPECIALIZE}
    for n, k in real.items():
        monkeypatch.setattr(ta, n, _Recorder(n, k, log))
    # The steps share their metadata buffers, as the engine's do: each is
    # launched before the next one is made (a list of them would hold the
    # last step's lengths in every step).
    steps = _engine_like_steps(hq, hkv, D, dtype)
    first, n, p = next(steps)
    looked_up = ta.precompile(**first, **settings)
    split = settings["num_splits"] != 1
    tiles = len(ta.tile_variants(hq // hkv, D, settings["large_tiles"]))
    assert looked_up == tiles * (2 if split else 1) + split
    assert len(log["warm"]) == looked_up
    tree_attention(**first, max_nodes=n, max_prefix=p, **settings)
    for args, n, p in steps:
        tree_attention(**args, max_nodes=n, max_prefix=p, **settings)
    launched = set(log["launch"])
    assert launched <= set(log["warm"]), launched - set(log["warm"])
    # The steps above do reach every variant (the check is not vacuous).
    assert len(launched) == looked_up

    if DEV != "cuda":
        return
    monkeypatch.undo()
    dev = torch.cuda.current_device()

    def cached():
        return sum(len(k.device_caches[dev][0]) for k in real.values())
    steps = _engine_like_steps(hq, hkv, D, dtype)
    first, n, p = next(steps)
    ta.precompile(**first, **settings)
    before = cached()
    tree_attention(**first, max_nodes=n, max_prefix=p, **settings)
    for args, n, p in steps:
        tree_attention(**args, max_nodes=n, max_prefix=p, **settings)
    torch.cuda.synchronize()
    assert cached() == before


def test_page_ids_are_widened_before_addressing_the_caches():
    """A page id times the cache's block stride passes 2^31 once one
    layer's K/V cache holds 2^31 elements (4 GiB of bf16: e.g. a 1B model
    at vLLM's default memory share of an H100): the compiled kernels widen
    every page id read from the block table to int64 first, as vLLM's own
    Triton attention does (found in review, 2026-12-05: the int32 product
    wrapped; in Triton's interpreter a 2.25e9-element cache read past its
    end). Checked on the IR of the kernels compiled for sm_90 (Triton's
    own toolchain, no GPU needed): without the widening this fails."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_jetspec.kernels.compile_check",
         "--attention"], capture_output=True, text=True, env=env,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok   attention_") == 2
    if DEV != "cuda":
        return
    # On a GPU, the kernel itself over a 4.5 GB bf16 cache, reading pages
    # past 2^31 / block stride (single pass and split)
    bs, D, P, pg = 16, 64, 40, 1_090_000
    kv = torch.empty(pg + 4, 2, bs, 1, D, dtype=torch.bfloat16, device=DEV)
    g = torch.Generator().manual_seed(0)
    kv[pg:pg + 3] = torch.randn(3, 2, bs, 1, D, generator=g).to(kv)
    q = torch.randn(1, 1, D, generator=g).to(kv)
    bt = torch.arange(pg, pg + 3, dtype=torch.int32, device=DEV)[None]
    pre = torch.tensor([P], dtype=torch.int32, device=DEV)
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    mask = torch.ones(1, 1, 1, dtype=torch.long, device=DEV)
    k = kv[pg:pg + 3, 0].reshape(-1, D)[:P + 1].float()
    v = kv[pg:pg + 3, 1].reshape(-1, D)[:P + 1].float()
    want = torch.softmax(q[0].float() @ k.T * D ** -0.5, -1) @ v
    for splits in (1, 2):
        got = tree_attention(q, kv[:, 0], kv[:, 1], bt, pre, qsl, mask,
                             D ** -0.5, max_nodes=1, num_splits=splits,
                             max_prefix=P)
        assert (got[0].float() - want).abs().max().item() < 2e-2
    del kv


def _paged_step(g, n, prefixes, hq, hkv, D, bs):
    """A step's queries, split K/V caches over scattered pages, block table,
    prefixes and query starts: requests of ``n`` new tokens over
    ``prefixes`` cached ones (fp32, on the host)."""
    R = len(n)
    max_blocks = (max(p + k for p, k in zip(prefixes, n)) + bs - 1) // bs
    blocks = R * max_blocks + 2
    bt = torch.randperm(blocks, generator=g)[:R * max_blocks].view(
        R, max_blocks).int()
    k = torch.randn(blocks, bs, hkv, D, generator=g)
    v = torch.randn(blocks, bs, hkv, D, generator=g)
    q = torch.randn(sum(n), hq, D, generator=g)
    qsl = torch.tensor([0, *n]).cumsum(0).int()
    return q, k, v, bt, torch.tensor(prefixes).int(), qsl


@pytest.mark.parametrize("splits", [1, 3])
def test_non_causal_steps_see_every_new_token(splits):
    """A non-causal step (a bidirectional head's draft pass): every node
    sees all of its request's new tokens, later slots included. Each
    program used to stop at its own last node (right for ancestor rows)
    and, past one 64-key step, a node of an early tile missed later slots
    (requests of 100 new tokens, 8-node tiles: an error of order 1)."""
    g = torch.Generator().manual_seed(11)
    hq, hkv, D, bs = 16, 2, 32, 16
    n, prefixes = [100, 70, 1], [20, 5, 0]
    R, N = len(n), max(n)
    W = (N + 63) // 64
    mask = torch.zeros(R, N, W, dtype=torch.long)
    for r, k in enumerate(n):
        for w in range(W):
            b = min(max(k - 64 * w, 0), 64)
            mask[r, :, w] = -1 if b == 64 else (1 << b) - 1
    q, k, v, bt, pre, qsl = _paged_step(g, n, prefixes, hq, hkv, D, bs)
    want = tree_attention_ref(q, k, v, bt.long(), pre.long(), qsl.long(),
                              mask, D ** -0.5)
    got = tree_attention(*(t.to(DEV) for t in (q, k, v, bt, pre, qsl, mask)),
                         D ** -0.5, max_nodes=N, large_tiles=False,
                         num_splits=splits, max_prefix=max(prefixes),
                         causal=False)
    assert (got.cpu() - want).abs().max().item() < 2e-4


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_chain_requests_are_computed_not_read(splits, causal):
    """Requests flagged 0 in ``tree_rows`` (prefill chunks, plain decoding,
    the draft pass) attend among their new tokens causally (or, in a
    non-causal step, to all of them) without mask rows: the masks are
    narrower than their chunks (trees of at most 20 nodes beside chunks of
    150 and 70 tokens) and hold zeros for them, which read would hide
    every new token. A step like this built dense ``requests x chunk x
    words`` masks before (≈ 0.5 GB at 256 requests beside a 4,000-token
    chunk), which vLLM's memory profile never saw."""
    g = torch.Generator().manual_seed(13 + splits + 2 * causal)
    hq, hkv, D, bs = 8, 2, 32, 16
    n, prefixes = [150, 20, 1, 70, 7], [0, 33, 90, 16, 5]
    flags = [0, 1, 0, 0, 1]
    R, N = len(n), 20
    mask = torch.zeros(R, N, 1, dtype=torch.long)
    for r in (1, 4):
        logp = torch.randn(1, 8, 50, generator=g).log_softmax(-1)
        v, i = logp.topk(5, dim=-1)
        t = build_tree(v, i, torch.zeros(1, dtype=torch.long), n[r],
                       algo="accum_logp", width=5)
        rows = packed_ancestor_mask(t)[0]
        mask[r, :rows.shape[0]] = rows
    q, k, v, bt, pre, qsl = _paged_step(g, n, prefixes, hq, hkv, D, bs)
    tree_rows = torch.tensor(flags, dtype=torch.int32)
    want = tree_attention_ref(q, k, v, bt.long(), pre.long(), qsl.long(),
                              mask, D ** -0.5, tree_rows=tree_rows,
                              causal=causal)
    # the reference's chains are the explicit masks of before
    for r in (0, 2, 3):
        s, e, p = int(qsl[r]), int(qsl[r + 1]), prefixes[r]
        kk = k[bt[r].long()].reshape(-1, hkv, D)[:p + e - s]
        vv = v[bt[r].long()].reshape(-1, hkv, D)[:p + e - s]
        sc = torch.einsum("qhd,khd->hqk", q[s:e],
                          kk.repeat_interleave(hq // hkv, 1)) * D ** -0.5
        if causal:
            i = torch.arange(e - s)[:, None]
            sc = sc.masked_fill(torch.arange(p + e - s)[None] > p + i,
                                float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", sc.softmax(-1),
                           vv.repeat_interleave(hq // hkv, 1))
        assert (want[s:e] - ref).abs().max().item() < 1e-4, r
    got = tree_attention(*(t.to(DEV) for t in (q, k, v, bt, pre, qsl, mask)),
                         D ** -0.5, max_nodes=max(n), large_tiles=False,
                         num_splits=splits, max_prefix=max(prefixes),
                         causal=causal, tree_rows=tree_rows.to(DEV))
    assert (got.cpu() - want).abs().max().item() < 2e-4
    # a flag per request is read: fewer is one clear error
    with pytest.raises(ValueError, match="tree_rows"):
        tree_attention(*(t.to(DEV) for t in (q, k, v, bt, pre, qsl, mask)),
                       D ** -0.5, tree_rows=tree_rows[:3].to(DEV))
