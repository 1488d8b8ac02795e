"""vLLM kernels of a jetspec round whose compile-time constants follow the
step: every value compiled at the first launch, in vLLM's start-up
warm-up, instead of inside served steps.

vLLM's DFlash input kernel (``spec_decode/dflash/speculator.py:
_prepare_dflash_inputs_kernel``, which jetspec's draft pass runs as stock
``dflash`` does) takes ``BLOCK_SIZE = min(256, next_pow2(longest query of
the step + 1 + depth))``: a decode or verify step and vLLM's warm-up
prefill (``1 + drafts`` tokens) give 32 or 64, the first real prompts 128
and 256, each a Triton compilation inside a served step (vLLM's JIT
monitor on the H200, 2026-12-05: every jetspec and ``dflash`` engine; with
``--jit-monitor-mode=error`` a failed step). The kernel object in vLLM's
module is replaced by ``PrecompileOnFirstLaunch``, which launches it
unchanged and, at its first launch, compiles the other values with the
same arguments (Triton's ``warmup``: no launch)."""

from __future__ import annotations

from vllm.logger import init_logger

logger = init_logger("vllm.jetspec.v2")


class PrecompileOnFirstLaunch:
    """A Triton kernel whose constexpr ``name`` takes one of ``values``
    (set by the engine that needs it; empty: a plain pass-through):
    ``kernel[grid](...)`` launches as before, and the first launch also
    compiles the launch with each other value of ``name``."""

    def __init__(self, kernel, name: str) -> None:
        self.kernel = kernel
        self.name = name
        self.values: tuple[int, ...] = ()
        self.done = False

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        if self.done or not self.values:
            return launch

        def run(*args, **kwargs):
            out = launch(*args, **kwargs)
            self.done = True
            for v in self.values:
                if v != kwargs.get(self.name):
                    self.kernel.warmup(*args, grid=grid,
                                       **{**kwargs, self.name: v})
            logger.debug("jetspec: %s compiled for %s %s", getattr(
                self.kernel, "__name__", self.kernel), self.name,
                self.values)
            return out
        return run

    def __getattr__(self, attr):
        return getattr(self.kernel, attr)


def dflash_block_sizes(num_query_per_req: int) -> tuple[int, ...]:
    """Every ``BLOCK_SIZE`` vLLM's ``prepare_dflash_inputs`` may give its
    kernel for a draft pass of ``num_query_per_req`` tokens a request (a
    step's longest query is at least 1 token)."""
    lo = 1 << num_query_per_req.bit_length()     # next_pow2(1 + n)
    out, v = [], min(lo, 256)
    while v <= 256:
        out.append(v)
        v *= 2
    return tuple(out)


def install() -> PrecompileOnFirstLaunch:
    """Puts the wrapper in vLLM's DFlash speculator module (idempotent)
    and returns it."""
    from vllm.v1.worker.gpu.spec_decode.dflash import speculator as m
    k = m._prepare_dflash_inputs_kernel
    if not isinstance(k, PrecompileOnFirstLaunch):
        k = m._prepare_dflash_inputs_kernel = PrecompileOnFirstLaunch(
            k, "BLOCK_SIZE")
    return k


def want_dflash_block_sizes(num_query_per_req: int) -> None:
    """A jetspec draft pass of ``num_query_per_req`` tokens a request will
    run in this process: its input kernel's first launch compiles every
    block size it may take."""
    k = install()
    values = tuple(sorted(set(k.values)
                          | set(dflash_block_sizes(num_query_per_req))))
    if values != k.values:
        # (another engine of this process, of another depth: its first
        # launch compiles the new ones; the others are in Triton's cache)
        k.values, k.done = values, False
