"""Kernel tests run on the CPU through the Triton interpreter when no CUDA GPU is present.

No __init__.py here on purpose: a package named `kernels` would shadow the PyPI module of that name (METHOD.md B1).
"""

import os

import torch

# Must be set before any @triton.jit decoration, i.e. before tokpost_fast.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
