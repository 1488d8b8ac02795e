"""Full CUDA graphs for every budget a ``tree_budget: "auto"`` engine may
verify.

vLLM 0.26 replays a full graph of the target's forward only for a *uniform*
batch: every request schedules ``1 + num_speculative_tokens`` tokens (the
engine's largest budget). Its dispatcher keys those graphs on that one query
length, and the runner rounds every capture size up to a multiple of it. An
``auto`` engine verifies trees of several sizes (the cost model's
candidates), and plain steps of one token a request; all of them ran with
piecewise graphs (attention eager between graph pieces), slower per token
than the full graphs the cost model was measured with (results.md, the
eighth H100 run: verify 11.1 ms piecewise against 8.8 ms full at batch 4).

Here, for ``auto`` engines only, the query length becomes a per-step value:

* ``CudagraphDispatcher`` (the target runner's instance): full-graph keys
  for every length ``u`` in the engine's set (1, the candidates, the largest
  budget): for each capture size ``x`` with ``x % u == 0`` and ``u <= x <=
  u * max_num_seqs`` the key ``(x tokens, x // u requests, uniform)``; a
  uniform step of ``u`` pads to the smallest such ``x`` (the extra requests
  have no tokens: vLLM's padding), or, above them all, is not uniform.
* ``GPUModelRunner._check_and_update_cudagraph_mode``: resolves the graph
  mode and capture sizes as for a query length of 1, so vLLM does not round
  the sizes to multiples of the largest budget (the keys above only use
  sizes a length divides), then adds the keys.
* ``GPUModelRunner._determine_batch_execution_and_padding``: a step whose
  longest request has ``u`` tokens, ``u`` in the set, is checked for
  uniformity against ``u`` (vLLM's ``_is_uniform_decode``) and dispatched
  with it.
* ``GPUModelRunner._warmup_and_capture``: captures a uniform key with its
  own length (``x // requests``).

The tree-attention backend needs nothing new: its persistent mask buffer is
sized for the largest budget and a smaller tree's rows are written into its
corner; a graph's launch shape comes from its capture (``max_nodes = u``).
Static-budget engines are untouched (the set is empty).
"""

from __future__ import annotations

import contextlib

from vllm.logger import init_logger

logger = init_logger("vllm.jetspec.budget_graphs")


def uniform_sizes(capture_sizes: list[int], lengths: list[int],
                  max_num_seqs: int, max_size: int) -> dict[int, list[int]]:
    """Per query length ``u``: the capture sizes (ascending) a uniform batch
    of ``u``-token requests can pad to: multiples of ``u`` from ``u`` to
    ``u * max_num_seqs`` (so the key's request count, ``x // u``, is exact
    and names ``u``: no two lengths share a key) and at most ``max_size``."""
    out = {}
    for u in sorted(set(lengths)):
        out[u] = sorted({x for x in capture_sizes
                         if x % u == 0 and u <= x <= min(u * max_num_seqs,
                                                         max_size)})
    return out


def padded_uniform(sizes: list[int], num_tokens: int) -> int | None:
    """The smallest size >= ``num_tokens``, or None."""
    for x in sizes:
        if x >= num_tokens:
            return x
    return None


@contextlib.contextmanager
def query_len(runner, u: int):
    """The runner's and its dispatcher's uniform query length set to ``u``
    for the duration."""
    d = runner.cudagraph_dispatcher
    saved = runner.uniform_decode_query_len, d.uniform_decode_query_len
    runner.uniform_decode_query_len = d.uniform_decode_query_len = u
    try:
        yield
    finally:
        runner.uniform_decode_query_len, d.uniform_decode_query_len = saved


def install_dispatcher(d, lengths: list[int]) -> None:
    """Per-length padding on one dispatcher instance (uniform batches only;
    the rest is vLLM's)."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor

    orig = d._create_padded_batch_descriptor
    d._jetspec_lengths = list(lengths)
    d._jetspec_sizes = {}

    def _create_padded_batch_descriptor(num_tokens, uniform_decode, has_lora,
                                        num_active_loras=0):
        u = d.uniform_decode_query_len
        sizes = d._jetspec_sizes.get(u)
        if uniform_decode and sizes is not None and \
                d.cudagraph_mode.has_mode(CUDAGraphMode.FULL):
            x = padded_uniform(sizes, num_tokens)
            if x is not None:
                return BatchDescriptor(num_tokens=x, num_reqs=x // u,
                                       uniform=True, has_lora=has_lora,
                                       num_active_loras=num_active_loras)
            uniform_decode = False
        return orig(num_tokens, uniform_decode, has_lora, num_active_loras)

    d._create_padded_batch_descriptor = _create_padded_batch_descriptor


def add_uniform_keys(d, max_num_seqs: int) -> int:
    """After vLLM initialised the keys for a query length of 1: the full
    keys of every other length. Returns the number of keys added."""
    from vllm.config import CUDAGraphMode

    cc = d.compilation_config
    if not d.keys_initialized or \
            d.cudagraph_mode.decode_mode() != CUDAGraphMode.FULL or \
            not d.cudagraph_mode.separate_routine() or \
            not cc.cudagraph_capture_sizes:
        d._jetspec_sizes = {}
        return 0
    d._jetspec_sizes = uniform_sizes(
        list(cc.cudagraph_capture_sizes), d._jetspec_lengths, max_num_seqs,
        cc.max_cudagraph_capture_size)
    lora_cases = d._get_lora_cases()
    added = 0
    saved = d.uniform_decode_query_len
    try:
        for u, sizes in d._jetspec_sizes.items():
            d.uniform_decode_query_len = u
            for x in sizes:
                for n in lora_cases:
                    key = d._create_padded_batch_descriptor(x, True, n > 0, n)
                    if key not in d.cudagraph_keys[CUDAGraphMode.FULL]:
                        d.add_cudagraph_key(CUDAGraphMode.FULL, key)
                        added += 1
    finally:
        d.uniform_decode_query_len = saved
    return added


def wrap_check_and_update_cudagraph_mode(orig):
    def _check_and_update_cudagraph_mode(self, *args, **kwargs):
        lengths = getattr(self, "_jetspec_uniform_lengths", None)
        if not lengths:
            return orig(self, *args, **kwargs)
        self.cudagraph_dispatcher._jetspec_sizes = {}
        with query_len(self, 1):
            orig(self, *args, **kwargs)
        d = self.cudagraph_dispatcher
        n = add_uniform_keys(d, self.scheduler_config.max_num_seqs)
        if n:
            logger.info("jetspec: full CUDA graphs for verify steps of %s "
                        "tokens a request (%d keys)",
                        "/".join(str(u) for u in d._jetspec_sizes
                                 if d._jetspec_sizes[u]), n)
    return _check_and_update_cudagraph_mode


def wrap_determine_batch_execution_and_padding(orig):
    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        lengths = getattr(self, "_jetspec_uniform_lengths", None)
        u = kwargs.get("max_num_scheduled_tokens")
        if not lengths or u not in lengths or \
                u == self.uniform_decode_query_len:
            return orig(self, *args, **kwargs)
        with query_len(self, u):
            return orig(self, *args, **kwargs)
    return _determine_batch_execution_and_padding


def wrap_warmup_and_capture(orig):
    def _warmup_and_capture(self, desc, *args, **kwargs):
        lengths = getattr(self, "_jetspec_uniform_lengths", None)
        if not lengths or not desc.uniform or not desc.num_reqs:
            return orig(self, desc, *args, **kwargs)
        with query_len(self, desc.num_tokens // desc.num_reqs):
            return orig(self, desc, *args, **kwargs)
    return _warmup_and_capture


def enable(runner, lengths: list[int]) -> None:
    """Called at the end of the runner's ``__init__`` of an ``auto`` engine
    that captures CUDA graphs: ``lengths`` are the query lengths its steps
    may have (1 for a plain step, each candidate budget, the largest)."""
    d = getattr(runner, "cudagraph_dispatcher", None)
    if d is None:
        return
    runner._jetspec_uniform_lengths = sorted(set(lengths))
    install_dispatcher(d, runner._jetspec_uniform_lengths)


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as R

    if getattr(R, "_jetspec_budget_graphs", False):
        return
    R._check_and_update_cudagraph_mode = \
        wrap_check_and_update_cudagraph_mode(
            R._check_and_update_cudagraph_mode)
    R._determine_batch_execution_and_padding = \
        wrap_determine_batch_execution_and_padding(
            R._determine_batch_execution_and_padding)
    R._warmup_and_capture = wrap_warmup_and_capture(R._warmup_and_capture)
    R._jetspec_budget_graphs = True
