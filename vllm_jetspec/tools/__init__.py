"""The tools around the runtime: benchmarks, sweeps, the demo, the soak,
tau measurement, head training, asset building, the CPU GEMM probe, and the
engine-in-a-subprocess helper they share. Each runs as ``python -m
vllm_jetspec.tools.NAME`` and prints its options with ``--help``. Nothing in
the runtime (``tree``, ``head``, ``vllm_patches``, ``kernels``, ``reference``,
``replay``, ``autobudget``, ``graphed``) imports this package."""


def cpu_model() -> str:
    """This machine's CPU model name (``/proc/cpuinfo``; else what
    ``platform`` knows), for result rows and the demo's CPU line."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f
                         if ln.startswith("model name")), name)
    except OSError:
        pass
    return name
