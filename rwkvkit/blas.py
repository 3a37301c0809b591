"""Small matrix products of the decode fast path, each in its fastest form on the CPU.

One token at a time the products are small: one row against a projection matrix, a low-rank pair,
each head's (N, N) wkv state against a vector. torch's CPU kernels are slow at those sizes here
(benchmarks/RESULTS.md has the machine): a (1, 12, 64, 64) state times a vector takes 45-90 us in torch
and 7 us in numpy; a one-row product with a (768, 3072) matrix reads the weights about twice as fast in
numpy. So one sequence's fp32 products go through numpy's BLAS. With more sequences torch keeps them:
numpy's BLAS threads spin after a call and would contend with torch's threads over the same cores
(a batch-32 step measured 2.7x slower), and a batched state product is faster as a multiply-and-sum
than as torch's batched matmul (0.2 ms against 0.9 ms at batch 32). Gradients, other dtypes and other
devices get torch's own product.
"""

from __future__ import annotations

import numpy as np
import torch


def _numpy_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One sequence (``a.shape[0] == 1``) of fp32 CPU tensors, no gradient to record."""
    return (
        a.shape[0] == 1
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
    )


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a (1, K) and b (K, N) (or any shapes torch.matmul takes, a's first dimension being
    the batch): through numpy for one sequence of fp32 CPU tensors (see the module docstring)."""
    if _numpy_ok(a, b):
        return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))
    return a @ b


def linear_row(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for x (B, K) and weight (N, K); one fp32 CPU row goes through numpy."""
    if _numpy_ok(x, weight):
        return torch.from_numpy(x.detach().numpy() @ weight.detach().numpy().T)
    return x @ weight.T


def state_matvec(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``state @ x`` per head: state (B, H, V, K), x (B, H, K) -> (B, H, V)."""
    if _numpy_ok(state, x):
        return torch.from_numpy(np.matmul(state.detach().numpy(), x.detach().numpy()[..., None])[..., 0])
    if state.device.type == "cpu":
        return (state * x.unsqueeze(-2)).sum(-1)
    return (state @ x.unsqueeze(-1)).squeeze(-1)
