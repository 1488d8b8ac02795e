"""The tree-attention backend on the Triton kernel (``kernels/``).

Same paged layout and semantics as ``torch_attention`` (its reference),
but every request of a step goes through one launch of
``vllm_jetspec.kernels.tree_attention`` per layer: a request verifying a
tree uses its packed ancestor rows from ``tree_state``; every other request
(prefill, chunked prefill, plain decode, the DFlash draft pass) is a
chain, flagged 0 in the step's ``tree_rows``, whose causal mask (all of a
request's new tokens when the metadata is not causal) the kernel computes
instead of reading rows. The tree rows and flags are written once per step
by the metadata builder, shared by all layers: on the device (V2 trees
gathered from the drafter's buffers), and on the host only for the trees
the V1 hooks built there. The DFlash draft layers run
on this backend too, with their own builder: on CPU because it replaces
``CPU_ATTN``, on CUDA through ``JetSpecProposer._create_draft_vllm_config``
(vLLM would pick its own backend for the drafter).

Registered as ``AttentionBackendEnum.CUSTOM`` for jetspec engines on CUDA
(``TritonTreeAttentionBackend``), and, to test it without a GPU, in place
of ``CPU_ATTN`` on vLLM's CPU platform when ``JETSPEC_ATTENTION=triton``
(``TritonTreeAttentionBackendCPU``; the kernel then runs in Triton's
interpreter, so ``TRITON_INTERPRET=1`` must be set before Triton is first
imported). Prefill through a tree kernel is O(n^2) in masked tiles: right,
not fast; long-prompt prefill would want a causal varlen kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.utils.torch_utils import async_tensor_h2d
from vllm.v1.attention.backend import CommonAttentionMetadata

from . import tree_state
from .config import env_choice, verify_rows_setting
from .staging import Staging
from .torch_attention import (TorchTreeAttentionBackend,
                              TorchTreeAttentionImpl,
                              TorchTreeAttentionMetadataBuilder)

logger = init_logger("vllm.jetspec.triton_attention")

BITS = 64


def step_masks_host(num_reqs: int, trees: dict[int, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tree rows of one step on the host, from the host ``trees``
    (batch row -> [n, W] packed ancestor rows): ([R, N, W] int64 with each
    tree's rows at its request, zeros elsewhere; [R] int32 tree flags).
    Every other request is a chain, which the kernel computes (causal, or
    every new token in a non-causal step): no rows for it."""
    N = max((t.shape[0] for t in trees.values()), default=1)
    W = max((t.shape[1] for t in trees.values()), default=1)
    masks = torch.zeros(num_reqs, N, W, dtype=torch.long)
    flags = torch.zeros(num_reqs, dtype=torch.int32)
    for r, t in trees.items():
        masks[r, :t.shape[0], :t.shape[1]] = t.cpu()
        flags[r] = 1
    return masks, flags


@dataclass
class TritonTreeAttentionMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor      # [R + 1] int32, device
    prefix_lens: torch.Tensor          # [R] int32, device
    block_table: torch.Tensor          # [R, max_blocks] int32
    slot_mapping: torch.Tensor         # [num_tokens] int64
    masks: torch.Tensor                # [R, N, W] int64, tree rows only
    # [R] int32: 1 where a request verifies a tree (its rows in masks),
    # 0 for a chain (prefill, plain decoding, the draft pass), whose mask
    # the kernel computes
    tree_rows: torch.Tensor
    max_nodes: int                     # new tokens of the longest request
    # Bounds every prefix (host int): the step's longest sequence, or for
    # steps a full CUDA graph may replay the model's length (the tree
    # kernel's prefix splits are sized from it at capture).
    max_seq_len: int
    # Every tensor above in the builder's or vLLM's persistent buffers, so
    # a CUDA graph captured with this step's metadata replays correctly
    # with a later step's of the same shape (draft_pass.py checks it).
    graph_safe: bool = False
    # The step's requests attend causally among their new tokens (chains)
    # or not; DFlash's proposer asserts ``causal is False`` on the draft
    # metadata of a non-causal head.
    causal: bool = True


FULL_GRAPHS_ENV = "JETSPEC_FULL_GRAPHS"


def full_graphs_setting(env=None) -> bool:
    """``JETSPEC_FULL_GRAPHS``: ``1`` (default) lets vLLM capture FULL CUDA
    graphs of verify steps in which every request has exactly ``1 +
    num_speculative_tokens`` (= budget) tokens; ``0`` keeps the backend at
    piecewise graphs (attention eager between graph pieces)."""
    return env_choice(FULL_GRAPHS_ENV, ("0", "1"), "1", env) == "1"


class TritonTreeAttentionMetadataBuilder(TorchTreeAttentionMetadataBuilder):
    """Metadata of one step, shared by its layers.

    Full CUDA graphs (vLLM's ``FULL_AND_PIECEWISE``): the builder reports
    ``UNIFORM_BATCH`` support, so vLLM replays one graph of the whole
    forward for a verify step in which every request schedules exactly
    ``N = 1 + num_speculative_tokens`` tokens (a full tree), and piecewise
    graphs otherwise (prefill, trees cut by the scheduler, plain decoding).
    A graph replays the kernel arguments of its capture, so every tensor
    the kernel reads must keep its address: vLLM's query_start_loc,
    seq_lens, block table and slot mapping do (runner buffers), and the
    step's tree rows, tree flags, prefix lengths and query start offsets
    are written in place into buffers this builder owns (``[max_num_seqs,
    N, W]``, ``[max_num_seqs]`` twice and ``[max_num_seqs + 1]``) in every
    step. Only trees have rows (at most the budget's ``N`` each); every
    other request -- a prefill chunk of any length, plain decoding, the
    DFlash draft pass (which runs on this backend too, with its own
    builder: ``draft_pass.py``) -- is a chain the kernel computes, so no
    step builds masks of its chunk's length (before 2026-12-05 a step
    holding a prefill chunk longer than N built ``requests x chunk x
    words`` int64 masks: ≈ 0.5 GB at 256 requests beside a 4,000-token
    chunk, outside vLLM's memory profile). The launch shape comes from
    capture-time values in a step a graph may replay (``graph_safe``: its
    longest request within ``N``, or the draft pass's ``1 + depth``
    slots, ``reserve_nodes``): the grid from the padded request count and
    ``max_nodes`` and the prefix splits (``JETSPEC_TREE_SPLITS``) from the
    model's length instead of the step's longest prefix: each request
    divides its own prefix on the device.

    Prefix lengths are clamped at 0: vLLM's CUDA-graph memory profile
    (``profile_cudagraph_memory``) warms full graphs up with dummy
    sequence lengths shorter than their queries (``max_num_tokens //
    num_tokens``), which made the prefix negative and the kernel read
    before its pages (an illegal address on the H100, 2026-11-24)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        spec = vllm_config.speculative_config
        n = 1 + (spec.num_speculative_tokens or 0) if spec is not None else 1
        rows = vllm_config.scheduler_config.max_num_seqs
        words = (n + BITS - 1) // BITS
        self.masks_buf = torch.zeros(rows, n, words, dtype=torch.long,
                                     device=device)
        self.tree_buf = torch.zeros(rows, dtype=torch.int32, device=device)
        self.prefix_buf = torch.zeros(rows, dtype=torch.int32, device=device)
        # vLLM's query_start_loc is a runner buffer for target steps but a
        # new tensor in each DFlash draft pass (set_inputs_first_pass).
        self.qsl_buf = torch.zeros(rows + 1, dtype=torch.int32,
                                   device=device)
        # New tokens a request of a graph-replayable step may have
        self.graph_nodes = n
        # The tree rows' host-to-device copy through a pinned buffer of our
        # own (trees the V1 hooks built on the host)
        self.staging = Staging(device)
        self.max_model_len = vllm_config.model_config.max_model_len
        # an all-tree V2 step's metadata in one launch (CUDA); the switch
        # of the V2 verify step's kernels
        self.metadata_kernel = verify_rows_setting() == "kernel"
        # a step without trees likewise (tests set it on the host: the
        # kernel in Triton's interpreter)
        self.chain_kernel = self.metadata_kernel and \
            torch.device(device).type == "cuda"

    def reserve_nodes(self, n: int) -> None:
        """Steps of up to ``n`` new tokens a request may be replayed by a
        CUDA graph (before any is captured): their launch is sized from
        capture-time bounds. The draft pass of a bidirectional head runs
        ``1 + depth`` query slots a request, more than the budget when
        ``tree_budget`` is below the head's block size, and vLLM captures
        FULL draft graphs whatever the builder says (found in review,
        2026-12-05: such a step then built fresh tensors, which a replay
        read freed; since chains have no rows every step's tensors are the
        builder's, and this keeps its launch bounds capture-proof)."""
        self.graph_nodes = max(self.graph_nodes, n)

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        from vllm.platforms import current_platform
        from vllm.v1.attention.backend import AttentionCGSupport
        if not current_platform.is_cuda() or not full_graphs_setting():
            return AttentionCGSupport.NEVER
        splits_setting()        # a bad value is refused at start-up
        return AttentionCGSupport.UNIFORM_BATCH

    def build(self, common_prefix_len: int,
              common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TritonTreeAttentionMetadata:
        m = common_attn_metadata
        R = m.num_reqs
        causal = m.causal if isinstance(m.causal, bool) else True
        qsl_cpu = m.query_start_loc_cpu[:R + 1]
        qsl = m.query_start_loc[:R + 1]
        max_nodes = int((qsl_cpu[1:] - qsl_cpu[:-1]).max()) if R else 0
        dev = tree_state.device_trees() if causal else None
        # Trees the V1 hooks built on the host (none on V2: ``dev``)
        host_trees = tree_state.masks_for_step(R) if causal else {}
        rows, N, W = self.masks_buf.shape
        if R > rows:
            raise RuntimeError(f"jetspec: a step of {R} requests, more than "
                               f"max_num_seqs ({rows})")
        masks, flags = self.masks_buf[:R], self.tree_buf[:R]
        safe = max_nodes <= self.graph_nodes
        all_trees = dev is not None and dev.tree_rows.all() \
            and dev.masks.shape[1:] == (N, W)
        from vllm_jetspec.kernels import tree_verify, tree_verify_ref
        seq = m.seq_lens[:R]
        if all_trees:
            # V2 rounds, every request verifying a tree: its rows are on
            # the device already (the drafter's); they, the flags, the
            # prefixes and the query starts in one launch on CUDA, no host
            # work (the torch reference otherwise: JETSPEC_VERIFY_ROWS=torch)
            fn = tree_verify.tree_step_metadata if dev.masks.is_cuda and \
                self.metadata_kernel else tree_verify_ref.tree_step_metadata_ref
            fn(dev.masks, dev.idx_mapping, seq, qsl, self.masks_buf,
               self.prefix_buf, self.qsl_buf, self.tree_buf)
            return self._metadata(m, max_nodes, safe, causal)
        # Chains everywhere (flags 0), prefixes and query starts: one launch
        # on CUDA; then the rows and flags of the step's trees, if any.
        fn = tree_verify.chain_step_metadata if self.chain_kernel else \
            tree_verify_ref.chain_step_metadata_ref
        fn(qsl, seq, self.prefix_buf, self.qsl_buf, self.tree_buf)
        if host_trees:
            # Trees the V1 hooks built on the host, in place
            # (stream-ordered after the previous step's reads); rows past a
            # tree's nodes and words past its width are never read.
            host, host_flags = step_masks_host(R, host_trees)
            nn, ww = host.shape[1:]
            d_masks, d_flags = self.staging.to_device(host, host_flags)
            masks[:, :nn, :ww].copy_(d_masks)
            flags.copy_(d_flags)
        _device_tree_rows(masks, flags, dev)
        return self._metadata(m, max_nodes, safe, causal)

    def _metadata(self, m, max_nodes, safe, causal):
        R = m.num_reqs
        return TritonTreeAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=self.qsl_buf[:R + 1],
            prefix_lens=self.prefix_buf[:R],
            block_table=m.block_table_tensor[:R],
            slot_mapping=m.slot_mapping,
            masks=self.masks_buf[:R],
            tree_rows=self.tree_buf[:R],
            max_nodes=max_nodes,
            max_seq_len=self.max_model_len if safe else int(m.max_seq_len),
            graph_safe=safe,
            causal=causal)


def _device_tree_rows(masks: torch.Tensor, flags: torch.Tensor,
                      dev: "tree_state.DeviceTrees | None") -> None:
    """V2 rounds in a step that also holds other requests (a prefill):
    the tree rows from the drafter's device buffers, and their flags, over
    the chains' (flags 0) just written."""
    if dev is None or not dev.tree_rows.any():
        return
    t = async_tensor_h2d(np.flatnonzero(dev.tree_rows), masks.device)
    k = min(dev.masks.shape[1], masks.shape[1])
    w = min(dev.masks.shape[2], masks.shape[2])
    masks[t, :k, :w] = dev.masks[dev.idx_mapping.long()[t], :k, :w]
    flags[t] = 1


SPLITS_ENV = "JETSPEC_TREE_SPLITS"


def splits_setting(env=None, cuda: bool = True) -> int | str:
    """``JETSPEC_TREE_SPLITS``: prefix splits of the tree kernel
    (flash-decoding), an integer >= 1 (1: the single-pass kernel) or
    ``auto`` (about two programs per SM; ``kernels.tree_attention.
    choose_splits``). The default is ``auto`` on CUDA and 1 elsewhere
    (``cuda=False``): Triton's interpreter runs programs one after
    another, so splits only add programs and a combine pass (the CPU
    engine test of this backend went from ≈ 2 to over 10 minutes with
    them). A batch-1 budget-16 step of the Qwen3-8B shape has 8 programs
    without splits: each reads its whole prefix alone (≈ 31 µs a layer on
    an H200, 2026-12-02)."""
    v = (os.environ if env is None else env).get(
        SPLITS_ENV, "auto" if cuda else "1").strip()
    if v == "auto":
        return v
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"jetspec: {SPLITS_ENV} must be an integer >= 1 or "
                         f"'auto', got {v!r}")
    return int(v)


TILES_ENV = "JETSPEC_TREE_TILES"


def tiles_setting(env=None) -> bool:
    """``JETSPEC_TREE_TILES``: ``large`` (default: 128-row programs for
    large trees and prefills, 64-row ones otherwise; ``kernels.
    tree_attention.tile_config``) or ``small`` (64-row programs for every
    launch). True for large."""
    return env_choice(TILES_ENV, ("small", "large"), "large", env) == "large"


PRECISION_ENV = "JETSPEC_TREE_PRECISION"


def precision_setting(env=None) -> str:
    """``JETSPEC_TREE_PRECISION``: precision of the tree kernel's dot
    products for fp32 models, ``ieee`` (default) or ``tf32`` (what vLLM's
    own Triton attention uses for fp32: faster on tensor cores, ~1e-3
    relative error). bf16/fp16 models are unaffected."""
    return env_choice(PRECISION_ENV, ("ieee", "tf32"), "ieee", env)


class TritonTreeAttentionImpl(TorchTreeAttentionImpl):

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from vllm.platforms import current_platform
        self.splits = splits_setting(cuda=current_platform.is_cuda())
        self.large_tiles = tiles_setting()
        self.precision = precision_setting()
        self.compiled = False

    def do_kv_cache_update(self, layer, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """On CUDA, vLLM's own cache-write op: it skips padding slots (< 0)
        on the device. The torch path it replaces selects the valid rows
        with a boolean index, which waits for the GPU once per layer."""
        if not kv_cache.is_cuda:
            return super().do_kv_cache_update(layer, key, value, kv_cache,
                                              slot_mapping)
        from vllm import _custom_ops as ops
        n = slot_mapping.shape[0]
        ops.reshape_and_cache_flash(key[:n], value[:n], kv_cache[:, 0],
                                    kv_cache[:, 1], slot_mapping,
                                    self.kv_cache_dtype, layer._k_scale,
                                    layer._v_scale)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: TritonTreeAttentionMetadata | None,
                output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        from ..kernels.tree_attention import tree_attention

        m = attn_metadata
        if not self.write_step_kv(layer, key, value, kv_cache, m,
                                  output_scale, output_block_scale):
            return output
        logger.info_once("jetspec Triton tree-attention backend in use")
        n_tok = m.num_actual_tokens
        q = query.view(-1, self.num_heads, self.head_size)[:n_tok]
        out = output.view(-1, self.num_heads, self.head_size)[:n_tok]
        if not self.compiled:
            self.compiled = True
            self.precompile(q, kv_cache, m, out)
        tree_attention(q, kv_cache[:, 0], kv_cache[:, 1], m.block_table,
                       m.prefix_lens, m.query_start_loc, m.masks,
                       self.scale, max_nodes=m.max_nodes, out=out,
                       num_splits=self.splits, max_prefix=m.max_seq_len,
                       large_tiles=self.large_tiles,
                       precision=self.precision, causal=m.causal,
                       tree_rows=m.tree_rows)
        return output

    def precompile(self, q, kv_cache, m, out) -> None:
        """At the layer's first call (vLLM's profile or warm-up step, before
        its JIT monitor starts), every tree-kernel variant a later step may
        launch on these tensors (``kernels.tree_attention.precompile``): the
        warm-up's 17-token prefills leave the large tile to the first real
        prompt otherwise. A GPU only (Triton's interpreter compiles
        nothing); layers after the first find Triton's cache."""
        if not q.is_cuda:
            return
        import time

        from ..kernels.tree_attention import precompile
        t0 = time.perf_counter()
        n = precompile(q, kv_cache[:, 0], kv_cache[:, 1], m.block_table,
                       m.prefix_lens, m.query_start_loc, m.masks,
                       self.scale, out=out, num_splits=self.splits,
                       large_tiles=self.large_tiles,
                       precision=self.precision, tree_rows=m.tree_rows)
        logger.info_once("jetspec: %d tree-attention kernel variants "
                         "compiled (or in Triton's cache) before serving "
                         "(%.1f s)", n,
                         time.perf_counter() - t0)


class TritonTreeAttentionBackend(TorchTreeAttentionBackend):

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[TritonTreeAttentionImpl]:
        return TritonTreeAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TritonTreeAttentionMetadataBuilder]:
        return TritonTreeAttentionMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [16, 32, 64, 128, 256]   # the kernel needs a power of two


class TritonTreeAttentionBackendCPU(TritonTreeAttentionBackend):
    """The same, registered over ``CPU_ATTN`` (vLLM maps the name back to
    the registry entry) to run the kernel in Triton's interpreter."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"
