"""vllm-jetspec: JetSpec parallel tree speculative decoding for stock vLLM.

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process it starts (front end, engine core, workers), so it must be
cheap and idempotent: it imports nothing heavy until the vLLM integration
needs it.
"""

__version__ = "0.1.0.dev0"

_registered = False


def register() -> None:
    """Entry point called by vLLM's plugin loader in every process."""
    global _registered
    if _registered:
        return
    _registered = True
    import logging
    import os

    import sys

    log = logging.getLogger("vllm.jetspec")
    # Only inside vLLM (which has imported itself before calling us): the
    # patches are inert for every method but jetspec.
    if "vllm" in sys.modules:
        from .vllm_patches import apply

        for p in apply():
            log.debug("vllm-jetspec: %s -> %s", p.replaces, p.by)
    # vLLM's own logger hierarchy, so users control it with VLLM_LOGGING_*.
    log.debug("vllm-jetspec %s registered in pid %d", __version__,
              os.getpid())
