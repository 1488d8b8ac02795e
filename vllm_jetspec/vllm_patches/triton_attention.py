"""The tree-attention backend on the Triton kernel (``kernels/``).

Same paged layout and semantics as ``torch_attention`` (its reference),
but every request of a step goes through one launch of
``vllm_jetspec.kernels.tree_attention`` per layer: a request verifying a
tree uses its packed ancestor rows from ``tree_state``; every other request
(prefill, chunked prefill, plain decode, the DFlash draft pass) is a
chain, i.e. the causal mask in the same packed form (all of a request's new
tokens when the metadata is not causal). The masks are built once per step
by the metadata builder, shared by all layers: on the device (chains sliced
from one stored chain, V2 trees gathered from the drafter's buffers), and
on the host only for the trees the V1 hooks built there. The DFlash draft layers run
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

import functools
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


def chain_words(n: int, words: int, device) -> torch.Tensor:
    """[n, words] int64 packed causal rows: row i has bits 0..i set."""
    from ..kernels.tree_verify_ref import prefix_words
    return prefix_words(torch.arange(n, device=device), words)


@functools.lru_cache(maxsize=64)
def _chain_host(n: int, words: int) -> torch.Tensor:
    """``chain_words`` on the host, once per shape (read only)."""
    return chain_words(n, words, "cpu")


def step_masks_host(query_start_loc_cpu: torch.Tensor, causal: bool,
                    trees: dict[int, torch.Tensor]) -> torch.Tensor:
    """[R, N, W] int64 packed masks of one step on the host: tree rows
    where given, else causal chains (or, not causal, every new token for
    every row); ``trees`` are host tensors."""
    n = (query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]).tolist()
    R, N = len(n), max(n, default=0)
    W = max(1, (N + BITS - 1) // BITS)
    chain = _chain_host(max(N, 1), W)
    masks = chain[None].repeat(R, 1, 1)
    for r, nr in enumerate(n):
        if r in trees:
            t = trees[r].cpu()
            masks[r] = 0
            masks[r, :t.shape[0], :t.shape[1]] = t
        elif not causal and nr:
            masks[r] = chain[nr - 1]
    return masks


def step_masks_device(chain: torch.Tensor, qsl: torch.Tensor, causal: bool,
                      n: int, words: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``step_masks_host`` without trees, made where ``chain`` is (the
    device) from it: ``chain`` holds ``chain_words`` of at least ``n``
    rows and ``words`` words (row i of a wider chain has no bit past word
    i // 64, so its corner is the narrower chain); ``qsl`` [R + 1] the
    step's query start locations there. [R, n, words], into ``out`` when
    given. No host work beyond the launch and nothing copied from the
    host: a step with a long prefill chunk no longer builds and copies
    megabytes of chain rows on the host (R x n x words int64: 16 MiB for
    32 requests and a 2048-token chunk)."""
    R = qsl.shape[0] - 1
    c = chain[:n, :words]
    src = c.unsqueeze(0).expand(R, n, words)
    if not causal:
        # every new token of the request for each of its rows (a request
        # without tokens keeps the chain: never read)
        k = (qsl[1:] - qsl[:-1]).long()
        block = c[(k - 1).clamp(min=0)].unsqueeze(1).expand(R, n, words)
        src = torch.where((k > 0)[:, None, None], block, src)
    if out is None:
        return src.contiguous()
    return out.copy_(src)


@dataclass
class TritonTreeAttentionMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor      # [R + 1] int32, device
    prefix_lens: torch.Tensor          # [R] int32, device
    block_table: torch.Tensor          # [R, max_blocks] int32
    slot_mapping: torch.Tensor         # [num_tokens] int64
    masks: torch.Tensor                # [R, N, W] int64
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
    step's masks, prefix lengths and query start offsets are written in
    place into buffers this builder owns (``[max_num_seqs, N, W]``,
    ``[max_num_seqs]`` and ``[max_num_seqs + 1]``; the metadata then says
    ``graph_safe``) whenever the step fits them. The DFlash draft pass,
    when it runs on this backend, uses the same buffers of its own builder
    (``draft_pass.py``). Steps that do not fit (prefill chunks longer than
    N, the draft pass when its 1 + depth slots exceed N) never run as a
    full graph and get fresh tensors. The launch shape comes from
    capture-time values only: the grid from the padded request count and
    ``max_nodes`` (= N in every uniform step) and the prefix splits
    (``JETSPEC_TREE_SPLITS``) from the model's length instead of the step's
    longest prefix: each request divides its own prefix on the device.

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
        self.prefix_buf = torch.zeros(rows, dtype=torch.int32, device=device)
        # vLLM's query_start_loc is a runner buffer for target steps but a
        # new tensor in each DFlash draft pass (set_inputs_first_pass).
        self.qsl_buf = torch.zeros(rows + 1, dtype=torch.int32,
                                   device=device)
        # The masks' host-to-device copy through a pinned buffer of our own
        # (trees the V1 hooks built on the host)
        self.staging = Staging(device)
        # Causal rows for steps without host trees, made on the device
        # once and grown when a step has more new tokens (a prefill chunk)
        self.chain = chain_words(n, words, device)
        self.max_model_len = vllm_config.model_config.max_model_len
        # an all-tree V2 step's metadata in one launch (CUDA); the switch
        # of the V2 verify step's kernels
        self.metadata_kernel = verify_rows_setting() == "kernel"
        # a step without trees likewise (tests set it on the host: the
        # kernel in Triton's interpreter)
        self.chain_kernel = self.metadata_kernel and \
            torch.device(device).type == "cuda"

    def reserve_nodes(self, n: int) -> None:
        """Persistent buffers for steps of up to ``n`` new tokens a request
        (before any CUDA graph is captured). The draft pass of a
        bidirectional head runs ``1 + depth`` query slots a request, more
        than the budget the buffers are sized from when ``tree_budget`` is
        below the head's block size; vLLM captures FULL draft graphs
        whatever the builder says, so a draft step that did not fit built
        its prefixes and masks in fresh tensors, which a replay then read
        freed (found in review, 2026-12-05). Only the drafter's builders
        are widened: the target's all-tree path wants rows of the budget."""
        rows, N, _ = self.masks_buf.shape
        if n <= N:
            return
        words = (n + BITS - 1) // BITS
        self.masks_buf = torch.zeros(rows, n, words, dtype=torch.long,
                                     device=self.masks_buf.device)
        if n > self.chain.shape[0]:
            self.chain = chain_words(n, words, self.chain.device)

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
        n = (qsl_cpu[1:] - qsl_cpu[:-1])
        max_nodes = int(n.max()) if R else 0
        dev = tree_state.device_trees() if causal else None
        # Trees the V1 hooks built on the host (none on V2: ``dev``)
        host_trees = tree_state.masks_for_step(R) if causal else {}
        rows, N, W = self.masks_buf.shape
        safe = R <= rows and max_nodes <= N
        if safe:
            masks = self.masks_buf[:R]
            all_trees = dev is not None and dev.tree_rows.all() \
                and dev.masks.shape[1:] == (N, W)
            if all_trees and dev.masks.is_cuda and self.metadata_kernel:
                # V2 rounds, every request verifying a tree: its rows are
                # on the device already (the drafter's); they, the
                # prefixes and the query starts in one launch, no host
                # work.
                from vllm_jetspec.kernels.tree_verify import \
                    tree_step_metadata
                tree_step_metadata(dev.masks, dev.idx_mapping,
                                   m.seq_lens[:R], qsl, self.masks_buf,
                                   self.prefix_buf, self.qsl_buf)
                return self._metadata(m, self.qsl_buf[:R + 1],
                                      self.prefix_buf[:R], masks,
                                      max_nodes, True, causal)
            if all_trees:
                torch.index_select(dev.masks, 0, dev.idx_mapping.long(),
                                   out=self.masks_buf[:len(dev.tree_rows)])
            elif host_trees:
                host = step_masks_host(qsl_cpu, causal, host_trees)
                # In place (stream-ordered after the previous step's
                # reads); rows past a request's tokens and words past its
                # tree are never read.
                nn, ww = host.shape[1], host.shape[2]
                self.staging.copy_into(masks if (nn, ww) == (N, W)
                                       else masks[:, :nn, :ww], host)
                _device_tree_rows(masks, dev)
            else:
                nn, ww = self._chain_shape(max_nodes)
                if self.chain_kernel:
                    # A step without trees (prefill, plain decoding, the
                    # draft pass): chains, prefixes and query starts in
                    # one launch instead of five.
                    from vllm_jetspec.kernels.tree_verify import \
                        chain_step_metadata
                    chain_step_metadata(qsl, m.seq_lens[:R], causal,
                                        masks[:, :nn, :ww], self.prefix_buf,
                                        self.qsl_buf)
                    _device_tree_rows(masks, dev)
                    return self._metadata(m, self.qsl_buf[:R + 1],
                                          self.prefix_buf[:R], masks,
                                          max_nodes, True, causal)
                step_masks_device(self.chain, qsl, causal, nn, ww,
                                  out=masks[:, :nn, :ww])
                _device_tree_rows(masks, dev)
            prefix = torch.clamp(m.seq_lens[:R] - (qsl[1:] - qsl[:-1]),
                                 min=0, out=self.prefix_buf[:R])
            qsl = self.qsl_buf[:R + 1].copy_(qsl)
        else:
            if host_trees:
                masks = async_tensor_h2d(step_masks_host(
                    qsl_cpu, causal, host_trees), qsl.device)
            else:
                nn, ww = self._chain_shape(max_nodes)
                masks = step_masks_device(self.chain, qsl, causal, nn, ww)
            _device_tree_rows(masks, dev)
            prefix = (m.seq_lens[:R] - (qsl[1:] - qsl[:-1])).clamp(
                min=0).to(torch.int32)
        return self._metadata(m, qsl, prefix, masks, max_nodes, safe,
                              causal)

    def _metadata(self, m, qsl, prefix, masks, max_nodes, safe, causal):
        R = m.num_reqs
        return TritonTreeAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=qsl,
            prefix_lens=prefix,
            block_table=m.block_table_tensor[:R],
            slot_mapping=m.slot_mapping,
            masks=masks,
            max_nodes=max_nodes,
            max_seq_len=self.max_model_len if safe else int(m.max_seq_len),
            graph_safe=safe,
            causal=causal)

    def _chain_shape(self, max_nodes: int) -> tuple[int, int]:
        """(rows, words) of a step's chain masks (as ``step_masks_host``
        shapes them), growing ``self.chain`` to a power of two of rows when
        a step has more new tokens than it holds."""
        n = max(max_nodes, 1)
        words = (n + BITS - 1) // BITS
        if n > self.chain.shape[0]:
            rows = 1 << (n - 1).bit_length()
            self.chain = chain_words(rows, (rows + BITS - 1) // BITS,
                                     self.chain.device)
        return n, words


def _device_tree_rows(masks: torch.Tensor,
                      dev: "tree_state.DeviceTrees | None") -> None:
    """V2 rounds in a step that also holds other requests (a prefill):
    the tree rows from the drafter's device buffers over the chain rows
    just copied from the host."""
    if dev is None or not dev.tree_rows.any():
        return
    t = async_tensor_h2d(np.flatnonzero(dev.tree_rows), masks.device)
    k = min(dev.masks.shape[1], masks.shape[1])
    w = min(dev.masks.shape[2], masks.shape[2])
    masks[t, :k, :w] = dev.masks[dev.idx_mapping.long()[t], :k, :w]


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
                       precision=self.precision, causal=m.causal)
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
                       precision=self.precision)
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
