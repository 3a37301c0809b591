"""rwkvkit's Triton WKV-7 kernels (rwkvkit.wkv.kernels) against the float64 reference.

Marked ``triton``: the default suite deselects them; ``make test-triton`` (or ``pytest -m triton`` in an
environment with Triton) runs them. Without CUDA they run on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py before anything imports Triton, and here again for a run
of this file alone).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from rwkvkit.wkv import wkv7  # noqa: E402
from rwkvkit.wkv.kernels import unavailable  # noqa: E402
from rwkvkit.wkv.kernels.wkv7_seq import wkv7_bwd, wkv7_fwd, wkv7_triton  # noqa: E402
from rwkvkit.wkv.kernels.wkv7_step import wkv7_step_triton  # noqa: E402
from rwkvkit.wkv.v7.step import wkv7_step  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B: int, T: int, H: int, N: int, seed: int = 0) -> list[torch.Tensor]:
    """r, w, k, v, a, b (B, T, H, N) shaped like RWKV-7's (w in its range, a = -kk, b = kk * iclr) and
    an initial state (B, H, N, N), all float32 on DEVICE."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    shape = (B, T, H, N)
    kk = torch.nn.functional.normalize(randn(*shape), dim=-1)
    iclr = torch.rand(*shape, generator=g)
    w = -0.6065 * torch.sigmoid(randn(*shape))
    tensors = [randn(*shape), w, 0.3 * randn(*shape), randn(*shape), -kk, kk * iclr, 0.3 * randn(B, H, N, N)]
    return [x.to(DEVICE) for x in tensors]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run_with_grads(fn, tensors: list[torch.Tensor], dy: torch.Tensor, ds: torch.Tensor):  # noqa: ANN001, ANN201
    """y, final state and the gradients of every input (the initial state last) of sum(y dy) + sum(s ds)."""
    leaves = [x.detach().requires_grad_() for x in tensors]
    y, s = fn(*leaves)
    ((y.to(dy.dtype) * dy).sum() + (s.to(ds.dtype) * ds).sum()).backward()
    return y, s, [x.grad for x in leaves]


@pytest.mark.parametrize("B, T, H, N", [(2, 37, 2, 32), (1, 5, 1, 16), (1, 16, 2, 16)])
def test_sequence_matches_reference_float32(B: int, T: int, H: int, N: int) -> None:
    tensors = make_inputs(B, T, H, N)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(B, T, H, N, generator=g).to(DEVICE)
    ds = torch.randn(B, H, N, N, generator=g).to(DEVICE)
    y, s, grads = run_with_grads(wkv7_triton, tensors, dy, ds)

    def reference(*xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return wkv7(*xs[:6], xs[6], impl="reference")

    y_ref, s_ref, grads_ref = run_with_grads(
        reference, [x.double() for x in tensors], dy.double(), ds.double()
    )
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5
    for name, grad, grad_ref in zip(("r", "w", "k", "v", "a", "b", "state"), grads, grads_ref, strict=True):
        assert rel_err(grad, grad_ref) < 1e-5, name


def test_sequence_bfloat16_inputs_and_zero_state() -> None:
    """bf16 inputs: y comes back in bf16 (state fp32), matching the fp64 reference on the same
    (bf16-rounded) inputs; state=None starts from zeros; gradients come back in the inputs' dtypes."""
    B, T, H, N = 1, 21, 2, 16
    tensors = [x.bfloat16() for x in make_inputs(B, T, H, N, seed=3)[:6]]
    leaves = [x.detach().requires_grad_() for x in tensors]
    y, s = wkv7(*leaves, impl="triton")
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    (y.float().sum() + s.sum()).backward()
    assert all(x.grad.dtype == torch.bfloat16 for x in leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in tensors]
    y_ref, s_ref = wkv7(*ref_leaves, impl="reference")
    (y_ref.sum() + s_ref.sum()).backward()
    assert rel_err(y.float(), y_ref) < 1e-2  # bf16 rounding of y
    assert rel_err(s, s_ref) < 1e-5
    for x, ref in zip(leaves, ref_leaves, strict=True):
        assert rel_err(x.grad.float(), ref.grad) < 2e-2


def test_final_state_only_gradient_and_chunked_prefill() -> None:
    """Two halves from the first half's final state equal one run; a loss on the final state only
    (y unused) reaches the initial state."""
    tensors = make_inputs(1, 40, 1, 16, seed=5)
    xs, s0 = tensors[:6], tensors[6]
    y_all, s_all = wkv7_triton(*xs, s0)
    y1, s1 = wkv7_triton(*(x[:, :19] for x in xs), s0)
    y2, s2 = wkv7_triton(*(x[:, 19:] for x in xs), s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s_all, rtol=1e-5, atol=1e-5)

    s0_leaf = s0.detach().requires_grad_()
    _, s = wkv7_triton(*xs, s0_leaf)
    s.sum().backward()
    s0_ref = s0.detach().double().requires_grad_()
    _, s_ref = wkv7(*(x.double() for x in xs), s0_ref, impl="reference")
    s_ref.sum().backward()
    assert rel_err(s0_leaf.grad, s0_ref.grad) < 1e-5


@pytest.mark.parametrize("N", [16, 32])
def test_step_in_place_matches_torch_step(N: int) -> None:
    tensors = make_inputs(2, 1, 2, N, seed=7)
    step = [x[:, 0].contiguous() for x in tensors[:6]]
    state = torch.randn(2, 2, N, N).to(DEVICE)
    y_ref, new_ref = wkv7_step(*step, state.clone())
    fresh = state.clone()
    y, new = wkv7_step_triton(*step, fresh)  # out=None: a new tensor, the state untouched
    torch.testing.assert_close(fresh, state)
    torch.testing.assert_close(new, new_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    in_place = state.clone()
    y2, new2 = wkv7_step_triton(*step, in_place, in_place)  # out=state: written in place
    assert new2 is in_place
    torch.testing.assert_close(in_place, new_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, y_ref, rtol=1e-5, atol=1e-5)


def test_unavailable_reasons() -> None:
    xs = make_inputs(1, 3, 1, 16)
    assert unavailable(xs[:6], xs[6]) is None
    assert "float" in unavailable([x.double() for x in xs[:6]], None)
    odd = make_inputs(1, 3, 1, 12)
    assert "power of two" in unavailable(odd[:6], None)
    with pytest.raises(ValueError, match="triton"):
        wkv7(*(x.double() for x in xs[:6]), impl="triton")


def test_opcheck_custom_ops() -> None:
    """The custom ops' registrations (schema, fake implementation, autograd) are consistent."""
    xs = make_inputs(1, 5, 1, 4, seed=9)
    r, w, k, v, a, b, s0 = xs
    torch.library.opcheck(wkv7_fwd, (r, w, k, v, a, b, s0), test_utils=("test_schema", "test_faketensor"))
    y, s, ckpt = wkv7_fwd(r, w, k, v, a, b, s0)
    torch.library.opcheck(
        wkv7_bwd,
        (r, w, k, v, a, b, ckpt, torch.ones_like(y), torch.ones_like(s)),
        test_utils="test_faketensor",
    )


def test_fake_tracing() -> None:
    """The fake implementations give the real outputs' shapes and dtypes (what torch.compile traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    xs = [x.bfloat16() if i < 6 else x for i, x in enumerate(make_inputs(2, 19, 2, 16))]
    with FakeTensorMode() as mode:
        y, s = wkv7_triton(*(mode.from_tensor(x) for x in xs))
    assert y.shape == (2, 19, 2, 16) and y.dtype == torch.bfloat16
    assert s.shape == (2, 2, 16, 16) and s.dtype == torch.float32


def test_torch_compile_traces_forward_and_backward() -> None:
    """torch.compile (fullgraph, aot_eager: no C++ toolchain needed) traces the ops and their backward."""
    xs = make_inputs(1, 9, 1, 16, seed=11)

    def loss(*leaves: torch.Tensor) -> torch.Tensor:
        y, s = wkv7_triton(*leaves)
        return y.square().sum() + s.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_leaves = [x.detach().requires_grad_() for x in xs]
    loss(*eager_leaves).backward()
    leaves = [x.detach().requires_grad_() for x in xs]
    compiled(*leaves).backward()
    for x, ref in zip(leaves, eager_leaves, strict=True):
        torch.testing.assert_close(x.grad, ref.grad)
