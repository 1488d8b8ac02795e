"""Triton kernels of vllm-jetspec. Each kernel sits beside its torch reference and
its test. Empty until the tree-attention kernel lands (see README status)."""
