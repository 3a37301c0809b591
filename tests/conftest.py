"""Suite-wide setup: without CUDA, Triton's interpreter is switched on before any test module imports
Triton (torch and transformers may import it while other modules are collected; Triton reads
TRITON_INTERPRET when its kernels are defined), so the ``triton``-marked tests run on CPU tensors.
It changes nothing where Triton is not installed, and no form picks a Triton kernel on the CPU unless a
test asks for impl="triton"."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
