"""The decode fast path against plain torch, for every version, batch size and dtype.

The mixes are written once; one token without gradients is made fast by what they call: the products
of :mod:`rwkvkit.blas` (one fp32 CPU row through numpy), the single-token WKV forms (``wkv*_step``, via
``rwkvkit.models.layers.run_wkv*``) and the in-place write of each layer's new state into the next
state. ``rwkvkit.blas.fast_decode(False)`` turns all of that off; the results must not change. Also the
single-token WKV forms against the operators' step-by-step references, and the helpers on their own
(gradients included: with a gradient to record they take torch's path).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from checkpoints import random_state_dict

from rwkvkit import blas, native
from rwkvkit.blas import fast_decode
from rwkvkit.models import layers, model_from_state_dict
from rwkvkit.wkv import wkv4, wkv4_step, wkv6, wkv6_step, wkv7, wkv7_step


@pytest.fixture(autouse=True)
def torch_decode_path():
    """These tests are about the pure-torch decode path (the native step: tests/test_native.py)."""
    with native.enabled(False):
        yield


CASES = {
    "4": dict(n_layer=3, n_embd=64, vocab_size=97),
    "5.2": dict(n_layer=3, n_embd=64, head_size=16, vocab_size=97, time_state=True),
    "6": dict(n_layer=3, n_embd=64, head_size=16, vocab_size=97),
    "7": dict(n_layer=8, n_embd=64, head_size=16, vocab_size=97),  # 8 layers: output scales below 1 too
}
STEP_FORMS = {"4": "wkv4_step", "5.2": "wkv6_step", "6": "wkv6_step", "7": "wkv7_step"}


def decode(model, tokens: torch.Tensor, fast: bool):
    """Prefill 5 tokens, then feed the rest one at a time; all logits and the final state."""
    with torch.inference_mode(), fast_decode(fast):
        logits, state = model(tokens[:, :5])
        steps = []
        for t in range(5, tokens.shape[1]):
            out, state = model(tokens[:, t : t + 1], state)
            steps.append(out)
    return torch.cat(steps, dim=1), state


def counting(monkeypatch, name: str) -> list[int]:
    """Count the calls the mixes make to the single-token WKV form ``name``."""
    calls = []
    original = getattr(layers, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layers, name, counted)
    return calls


@pytest.mark.parametrize("version", list(CASES))
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_decode_equals_the_general_path(version, batch, monkeypatch):
    model = model_from_state_dict(random_state_dict(version, seed=4, **CASES[version]))
    tokens = torch.randint(0, 97, (batch, 14), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    calls = counting(monkeypatch, STEP_FORMS[version])
    general, general_state = decode(model, tokens, fast=False)
    assert not calls  # plain torch: the operator itself
    fast, fast_state = decode(model, tokens, fast=True)
    assert len(calls) == 9 * CASES[version]["n_layer"]  # every version has the fast path: 9 tokens
    assert torch.get_num_threads() == threads  # the one-thread context of a one-row step was undone
    assert (fast - general).abs().max().item() <= 2e-5 * general.abs().max().item()
    for a, b in ((fast_state.wkv, general_state.wkv), (fast_state.att_shift, general_state.att_shift)):
        assert (a - b).abs().max().item() <= 2e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("version", list(CASES))
def test_fast_decode_in_bf16_is_as_close_to_fp32_as_the_general_path(version):
    """In bf16 both paths round differently; the fast one must not be further from fp32 than the other."""
    sd = random_state_dict(version, seed=4, **CASES[version])
    tokens = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    exact, _ = decode(model_from_state_dict(sd), tokens, fast=False)
    model = model_from_state_dict(sd, dtype=torch.bfloat16)
    general_err = (decode(model, tokens, fast=False)[0] - exact).abs().max().item()
    fast_err = (decode(model, tokens, fast=True)[0] - exact).abs().max().item()
    assert fast_err <= 1.5 * general_err + 1e-3 * exact.abs().max().item(), (fast_err, general_err)


@pytest.mark.parametrize("version", list(CASES))
def test_one_token_with_gradients_takes_the_plain_path(version):
    """One token with gradients (training at T = 1) gives the decode path's logits, and a gradient."""
    model = model_from_state_dict(random_state_dict(version, seed=4, **CASES[version]))
    tokens = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, state = model(tokens[:, :5])
        fast, _ = model(tokens[:, 5:], state)
    logits, _ = model(tokens[:, 5:], state)
    assert torch.allclose(logits, fast, atol=2e-5 * fast.abs().max().item())
    logits.square().mean().backward()
    assert model.head.weight.grad is not None and model.blocks[0].att.key.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("B", [1, 2])  # one sequence takes numpy's products, more take torch's
@pytest.mark.parametrize("into_buffer", [False, True])
def test_single_token_wkv_forms_equal_the_references(B, into_buffer):
    g = torch.Generator().manual_seed(B)
    H, N, C = 3, 8, 24

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def buffer(*shape):  # where the step writes the new state (NaN: every element must be written)
        return torch.full(shape, float("nan")) if into_buffer else None

    r, k, v = randn(B, H, N), randn(B, H, N), randn(B, H, N)
    w = -torch.exp(randn(B, H, N) - 1)
    kk = torch.nn.functional.normalize(randn(B, H, N), dim=-1)
    a, b = -kk, kk * torch.rand(B, H, N, generator=g)
    state = randn(B, H, N, N)
    before = state.clone()
    y, s = wkv7_step(r, w, k, v, a, b, state, buffer(B, H, N, N))
    y_ref, s_ref = wkv7(*(x.unsqueeze(1) for x in (r, w, k, v, a, b)), state, impl="reference")
    assert torch.allclose(y, y_ref[:, 0], atol=1e-5) and torch.allclose(s, s_ref, atol=1e-5)
    u = randn(H, N)
    y, s = wkv6_step(r, w, k, v, u, state, buffer(B, H, N, N))
    y_ref, s_ref = wkv6(*(x.unsqueeze(1) for x in (r, w, k, v)), u, state, impl="reference")
    assert torch.allclose(y, y_ref[:, 0], atol=1e-5) and torch.allclose(s, s_ref, atol=1e-5)
    assert torch.equal(state, before)  # the old state is left as it was
    w4, u4 = -torch.exp(randn(C)), randn(C)
    k4, v4 = randn(B, C), randn(B, C)
    st4 = torch.stack((randn(B, C), torch.rand(B, C, generator=g) + 0.5, randn(B, C)), dim=1)
    y, s = wkv4_step(w4, u4, k4, v4, st4, buffer(B, 3, C))
    y_ref, (aa, bb, pp) = wkv4(w4, u4, k4.unsqueeze(1), v4.unsqueeze(1), st4.unbind(1), impl="reference")
    assert torch.allclose(y, y_ref[:, 0], atol=1e-5)
    assert torch.allclose(s, torch.stack((aa, bb, pp), dim=1), atol=1e-5)


def _wkv_inputs(B: int, T: int, H: int = 3, N: int = 8):
    g = torch.Generator().manual_seed(B * 10 + T)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -torch.exp(torch.randn(B, T, H, N, generator=g) - 1)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, N, generator=g)
    u, state = torch.randn(H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    st4 = torch.stack((torch.randn(B, 24), torch.rand(B, 24) + 0.5, torch.randn(B, 24)), dim=1)
    return (r, w, k, v, a, b, u, state), st4


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 4])
def test_the_mixes_wkv_calls_write_the_new_state_in_place(B, T):
    """``run_wkv*`` with ``out``: the new state is written there (every element), one token or many, and
    equals what the plain operator gives."""
    (r, w, k, v, a, b, u, state), st4 = _wkv_inputs(B, T)
    k4, v4 = r.reshape(B, T, 24), v.reshape(B, T, 24)
    w4, u4 = -torch.exp(u.reshape(24)), u.reshape(24)
    calls = [
        (layers.run_wkv7, (r, w, k, v, a, b, state), lambda: wkv7(r, w, k, v, a, b, state)),
        (layers.run_wkv6, (r, w, k, v, u, state), lambda: wkv6(r, w, k, v, u, state)),
        (
            layers.run_wkv4,
            (w4, u4, k4, v4, st4),
            lambda: (lambda y, s: (y, torch.stack(s, dim=1)))(*wkv4(w4, u4, k4, v4, st4.unbind(1))),
        ),
    ]
    with torch.inference_mode():
        for run, args, plain in calls:
            with fast_decode(False):
                y_ref, s_ref = plain()
            out = torch.full_like(s_ref, float("nan"))
            y, s = run(*args, out=out)
            assert s is out and not out.isnan().any()
            assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(s, s_ref, atol=1e-5)


def test_the_wkv_calls_keep_gradients():
    """With gradients the mixes' WKV calls take the differentiable operator (T = 1 too)."""
    (r, w, k, v, a, b, _, state), _ = _wkv_inputs(1, 1)
    r = r.clone().requires_grad_()
    y, _ = layers.run_wkv7(r, w, k, v, a, b, state)
    y.sum().backward()
    r2 = r.detach().clone().requires_grad_()
    wkv7(r2, w, k, v, a, b, state, impl="reference")[0].sum().backward()
    assert torch.allclose(r.grad, r2.grad, atol=1e-5)


@pytest.mark.parametrize("B", [1, 4])
def test_decode_products_equal_torch(B):
    g = torch.Generator().manual_seed(0)
    x, w, lin = (
        torch.randn(B, 48, generator=g),
        torch.randn(48, 16, generator=g),
        torch.randn(24, 48, generator=g),
    )
    state, vec = torch.randn(B, 3, 8, 8, generator=g), torch.randn(B, 3, 8, generator=g)
    assert torch.allclose(blas.matmul(x, w), x @ w, atol=1e-5)
    assert torch.allclose(blas.linear_row(x, lin), x @ lin.T, atol=1e-5)
    assert torch.allclose(blas.state_matvec(state, vec), (state @ vec.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    # the mixes' (B, T, C) inputs: one row (B = T = 1) through numpy, the same as the module
    layer = torch.nn.Linear(48, 24, bias=False)
    x3 = x.unsqueeze(1)  # (B, 1, 48)
    with torch.no_grad():
        assert torch.allclose(blas.linear(layer, x3), layer(x3), atol=1e-5)
        assert torch.allclose(blas.matmul(x3, w), x3 @ w, atol=1e-5)
        assert blas.linear(layer, x3).shape == (B, 1, 24)
    # with a gradient to record, torch's own product (numpy would drop it)
    wg = w.clone().requires_grad_()
    blas.matmul(x, wg).sum().backward()
    assert torch.allclose(wg.grad, x.sum(0, keepdim=True).T.expand(48, 16), atol=1e-5)
    blas.linear(layer, x3).sum().backward()
    assert torch.allclose(layer.weight.grad, x.sum(0, keepdim=True).expand(24, 48), atol=1e-5)
    # other dtypes keep theirs
    assert blas.matmul(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("bf16_math", [False, True])
def test_bf16_products_of_many_rows_run_in_fp32_where_the_cpu_lacks_bf16_math(monkeypatch, bf16_math):
    """On a CPU without bf16 arithmetic, a bf16 layer's product of many rows is the fp32 product rounded
    to bf16 (exactly); with bf16 arithmetic it is torch's own bf16 product; one row and gradients keep
    their paths."""
    monkeypatch.setattr(blas, "cpu_has_bf16_math", lambda: bf16_math)
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(96, 80, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 7, 96, generator=g).to(torch.bfloat16)  # (B, T, C)
    b = torch.randn(96, 16, generator=g).to(torch.bfloat16)  # a low-rank factor (C, D)
    widened = torch.nn.functional.linear(x.float(), layer.weight.float()).to(torch.bfloat16)
    with torch.no_grad():
        y, m = blas.linear(layer, x), blas.matmul(x, b)
        with fast_decode(False):
            y_off, m_off = blas.linear(layer, x), blas.matmul(x, b)
    if bf16_math:
        assert torch.equal(y, layer(x)) and torch.equal(m, x @ b)
    else:
        assert torch.equal(y, widened) and torch.equal(m, (x.float() @ b.float()).to(torch.bfloat16))
    assert torch.equal(y_off, layer(x)) and torch.equal(m_off, x @ b)  # the switch turns it off
    # the fp32 product is the closer one to the exact product (bf16 rounding of the result only)
    exact = torch.nn.functional.linear(x.double(), layer.weight.double())
    assert (widened.double() - exact).abs().max() <= (layer(x).double() - exact).abs().max() + 1e-2
    xg = x.clone().requires_grad_()
    assert torch.equal(blas.linear(layer, xg), layer(xg))  # a gradient to record: torch's own product


def test_a_wide_bf16_product_widens_its_weight_in_blocks(monkeypatch):
    """A weight of more rows than WIDEN_ROWS (a vocabulary-sized head) widens a block at a time: the same
    fp32 product, rounded to bf16, as widening it whole (within one bf16 step of rounding)."""
    monkeypatch.setattr(blas, "WIDEN_ROWS", 32)
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(100, 48, generator=g).to(torch.bfloat16)  # 3 full blocks and a partial one
    x = torch.randn(3, 5, 48, generator=g).to(torch.bfloat16)
    whole = torch.nn.functional.linear(x.float(), weight.float())
    blocked = blas.widened_linear(x, weight)
    assert blocked.shape == (3, 5, 100) and blocked.dtype == torch.bfloat16
    torch.testing.assert_close(blocked.float(), whole, rtol=2**-8, atol=1e-6)


def test_a_bf16_model_prompt_without_bf16_math_matches_the_fp32_model(monkeypatch):
    """A bf16 model's prompt through the widened products stays within bf16 rounding of the fp32 model."""
    monkeypatch.setattr(blas, "cpu_has_bf16_math", lambda: False)
    widened_products = []

    def recording_linear(x, weight):
        widened_products.append((x.dtype, weight.dtype))
        return torch.nn.functional.linear(x, weight)

    monkeypatch.setattr(blas, "F", SimpleNamespace(linear=recording_linear))
    sd = random_state_dict("7", n_layer=2, n_embd=64, vocab_size=97, seed=5)
    fp32 = model_from_state_dict(sd)
    bf16 = model_from_state_dict(sd, dtype=torch.bfloat16)
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exact, _ = fp32(tokens)
        widened, _ = bf16(tokens)
        # r, k, v, output and the two channel-mix projections of both layers, and the head: fp32 products
        assert widened_products == [(torch.float32, torch.float32)] * (2 * 6 + 1)
        monkeypatch.setattr(blas, "cpu_has_bf16_math", lambda: True)
        plain, _ = bf16(tokens)
    assert len(widened_products) == 2 * 6 + 1  # none with bf16 arithmetic
    scale = exact.abs().max().item()
    assert (widened - exact).abs().max().item() < 0.05 * scale
    assert (plain - exact).abs().max().item() < 0.05 * scale
