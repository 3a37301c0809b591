"""The decode fast path (``Block.step`` and the mixes' ``step`` methods, used for one token without
gradients) against the general sequence path, for every version, batch size and dtype; and the
single-token WKV forms against the operators' step-by-step references."""

from __future__ import annotations

import pytest
import torch
from checkpoints import random_state_dict

from rwkvkit import blas
from rwkvkit.models import model_from_state_dict
from rwkvkit.wkv import wkv4, wkv4_step, wkv6, wkv6_step, wkv7, wkv7_step

CASES = {
    "4": dict(n_layer=3, n_embd=64, vocab_size=97),
    "5.2": dict(n_layer=3, n_embd=64, head_size=16, vocab_size=97, time_state=True),
    "6": dict(n_layer=3, n_embd=64, head_size=16, vocab_size=97),
    "7": dict(n_layer=8, n_embd=64, head_size=16, vocab_size=97),  # 8 layers: output scales below 1 too
}


def decode(model, tokens: torch.Tensor, fast: bool):
    """Prefill 5 tokens, then feed the rest one at a time; all logits and the final state."""
    model.fast_step = fast
    with torch.inference_mode():
        logits, state = model(tokens[:, :5])
        steps = []
        for t in range(5, tokens.shape[1]):
            out, state = model(tokens[:, t : t + 1], state)
            steps.append(out)
    return torch.cat(steps, dim=1), state


@pytest.mark.parametrize("version", list(CASES))
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_decode_equals_the_general_path(version, batch):
    model = model_from_state_dict(random_state_dict(version, seed=4, **CASES[version]))
    assert model.fast_step  # every version has the fast path
    tokens = torch.randint(0, 97, (batch, 14), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    general, general_state = decode(model, tokens, fast=False)
    fast, fast_state = decode(model, tokens, fast=True)
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
    # with a gradient to record, torch's own product (numpy would drop it)
    wg = w.clone().requires_grad_()
    blas.matmul(x, wg).sum().backward()
    assert torch.allclose(wg.grad, x.sum(0, keepdim=True).T.expand(48, 16), atol=1e-5)
    # other dtypes keep theirs
    assert blas.matmul(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16
