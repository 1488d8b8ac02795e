"""CUDA graphs for the round's small tensor functions.

Tree construction and acceptance are a few hundred tiny kernels each
(sorts, gathers, scatters over [batch, nodes]); launched one by one from
Python they cost milliseconds per round, more than they compute. Their
shapes are fixed by (batch size, budget, depth) and none of them waits for
the device, so each can be captured once per shape as a CUDA graph and
replayed with one launch.

``GraphedFn(fn)`` wraps a function of tensors, ``fn(*tensors, **static)``
where ``static`` holds hashable Python values (a budget, an algorithm
name); besides its result it may write tensors it holds (the runner's K/V
moves), never read host state that changes between calls. Per key (the
tensors' shapes and dtypes, and ``static``) the first call copies the
inputs into static buffers, runs ``fn`` on them (the warm-up, whose result
that call returns, so side effects happen once per call) and captures it;
every later call copies its inputs into that key's buffers and replays.
The result is ``fn``'s (tensors, tuples, lists and dataclasses of them,
with non-tensor fields from the capture run) **backed by the graph's
output buffers: valid until the next call with the same key**; a caller
that keeps a result longer clones it.

Pure torch and engine-agnostic. On CPU tensors, or when disabled, it
calls ``fn``. With ``host_graphs`` a ``HostGraph`` stands in for
``torch.cuda.CUDAGraph`` on any device (the CPU tests): it replays by
running ``fn`` on the static inputs and copying into the static outputs,
so the buffer plumbing is tested without a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

logger = logging.getLogger("vllm.jetspec.graphed")

MAX_GRAPHS = 64


def _flatten(x: Any, out: list[torch.Tensor]):
    """The tensors of ``x`` appended to ``out``; returns a rebuild spec."""
    if torch.is_tensor(x):
        out.append(x)
        return ("t",)
    if isinstance(x, (tuple, list)):
        return ("seq", type(x), [_flatten(v, out) for v in x])
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return ("dc", type(x), {f.name: _flatten(getattr(x, f.name), out)
                                for f in dataclasses.fields(x)})
    return ("const", x)


def _tensors(x: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _flatten(x, out)
    return out


def _rebuild(spec, it):
    kind = spec[0]
    if kind == "t":
        return next(it)
    if kind == "seq":
        return spec[1](_rebuild(s, it) for s in spec[2])
    if kind == "dc":
        return spec[1](**{k: _rebuild(s, it) for k, s in spec[2].items()})
    return spec[1]


class HostGraph:
    """``torch.cuda.CUDAGraph``'s role for CPU tests: ``replay`` runs the
    captured function on the static inputs into the static outputs."""

    def __init__(self) -> None:
        self.run: Callable[[], None] | None = None

    def replay(self) -> None:
        assert self.run is not None
        self.run()


@dataclasses.dataclass
class _Captured:
    inputs: list[torch.Tensor]        # static input buffers
    outputs: list[torch.Tensor]       # static output buffers
    spec: Any                         # how to rebuild fn's result
    graph: Any                        # torch.cuda.CUDAGraph or HostGraph


class GraphedFn:
    """See the module docstring. ``enabled=False``: always ``fn``.
    ``host_graphs=True``: capture CPU tensors with ``HostGraph`` (tests)."""

    def __init__(self, fn: Callable, name: str, enabled: bool = True,
                 max_graphs: int = MAX_GRAPHS,
                 host_graphs: bool = False) -> None:
        self.fn = fn
        self.name = name
        self.enabled = enabled
        self.max_graphs = max_graphs
        self.host_graphs = host_graphs
        self.graphs: dict[tuple, _Captured | None] = {}  # None: eager
        self.pool = None
        self.stream = None
        self.replays = 0
        self.full = False
        self.logged = False

    def __call__(self, *tensors: torch.Tensor, **static):
        if not self.enabled or not tensors:
            return self.fn(*tensors, **static)
        if not self.host_graphs and not all(t.is_cuda for t in tensors):
            return self.fn(*tensors, **static)
        key = (tuple((tuple(t.shape), t.dtype) for t in tensors),
               tuple(sorted(static.items())))
        cap = self.graphs.get(key, False)
        if cap is False:
            if len(self.graphs) >= self.max_graphs:
                if not self.full:
                    self.full = True
                    logger.warning("jetspec: %d shapes of %s captured, the "
                                   "most kept; new shapes run eagerly",
                                   self.max_graphs, self.name)
                return self.fn(*tensors, **static)
            cap, first = self._capture(key, tensors, static)
            self.graphs[key] = cap
            # fn ran once on these inputs (warm-up): its result, not a
            # replay (fn may have side effects, e.g. moving K/V).
            return first
        if cap is None:
            return self.fn(*tensors, **static)
        for buf, t in zip(cap.inputs, tensors):
            buf.copy_(t)
        cap.graph.replay()
        self.replays += 1
        return _rebuild(cap.spec, iter(cap.outputs))

    def _capture(self, key, tensors, static) -> tuple[_Captured | None,
                                                       Any]:
        """The captured graph (None: capture failed) and the result of the
        warm-up run of ``fn`` on these inputs."""
        inputs = [t.clone() for t in tensors]
        outputs: list[torch.Tensor] = []
        # The warm-up: lazy initialisation must not be captured. On the
        # current stream, in order with the work before and after it.
        first = self.fn(*inputs, **static)
        try:
            if self.host_graphs:
                spec = _flatten(first, [])
                for t in _tensors(first):
                    outputs.append(t.clone())
                graph = HostGraph()

                def run():
                    new: list[torch.Tensor] = []
                    _flatten(self.fn(*inputs, **static), new)
                    for o, n in zip(outputs, new):
                        o.copy_(n)
                graph.run = run
            else:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                    self.stream = torch.cuda.Stream()
                # capture_begin/end rather than ``torch.cuda.graph``, whose
                # entry synchronises, collects garbage and empties the
                # allocator's cache: a new shape mid-run (a batch that
                # shrinks, a tree cut near max_tokens) costs a capture only.
                graph = torch.cuda.CUDAGraph()
                self.stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.stream):
                    graph.capture_begin(pool=self.pool,
                                        capture_error_mode="thread_local")
                    try:
                        result = self.fn(*inputs, **static)
                    finally:
                        graph.capture_end()
                torch.cuda.current_stream().wait_stream(self.stream)
                spec = _flatten(result, outputs)
        except Exception as e:  # noqa: BLE001 - any failure: stay eager
            logger.warning("jetspec: could not capture %s as a graph "
                           "for %s (%s: %s); it runs eagerly for this shape",
                           self.name, key, type(e).__name__, e)
            return None, first
        if not self.logged:
            self.logged = True
            logger.info("jetspec: %s replays a graph per shape (%s)",
                        self.name, "host" if self.host_graphs else "CUDA")
        logger.debug("jetspec: captured %s for %s", self.name, key)
        return _Captured(inputs, outputs, spec, graph), first
