"""The tools around the runtime: benchmarks, sweeps, the demo, the soak,
tau measurement, head training, asset building, the CPU GEMM probe, and the
engine-in-a-subprocess helper they share. Each runs as ``python -m
vllm_jetspec.tools.NAME`` and prints its options with ``--help``. Nothing in
the runtime (``tree``, ``head``, ``vllm_patches``, ``kernels``, ``reference``,
``replay``, ``autobudget``, ``graphed``) imports this package."""
