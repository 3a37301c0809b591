"""rwkvkit.jax.rwkv7 against rwkvkit's torch RWKV-7 on random official-layout checkpoints: logits with and
without a carried state, and one jitted SGD training step (loss and a gradient against torch autograd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from rwkvkit.errors import RwkvkitError  # noqa: E402
from rwkvkit.jax import rwkv7 as jrwkv7  # noqa: E402
from rwkvkit.models import model_from_state_dict  # noqa: E402
from rwkvkit.models.rwkv7 import new_shape  # noqa: E402
from tests.checkpoints import random_state_dict  # noqa: E402


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def small():
    sd = random_state_dict("7", n_layer=2, n_embd=64, head_size=16, vocab_size=97, time_state=True, seed=3)
    return sd, model_from_state_dict(sd), jrwkv7.params_from_checkpoint(sd)


def test_logits_match_torch_and_state_carries(small):
    sd, model, params = small
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, want_state = model(tokens)
    fwd = jax.jit(jrwkv7.forward)
    got, state = fwd(params, jnp.asarray(tokens.numpy(), jnp.int32))
    assert got.shape == (2, 40, 97)
    assert rel_err(got, want) < 1e-4
    assert rel_err(state["wkv"], want_state.wkv) < 1e-4
    assert rel_err(state["att_shift"], want_state.att_shift) < 1e-4
    # two calls with the state carried == one call
    first, mid = fwd(params, jnp.asarray(tokens[:, :23].numpy(), jnp.int32))
    second, end = fwd(params, jnp.asarray(tokens[:, 23:].numpy(), jnp.int32), mid)
    assert rel_err(jnp.concatenate([first, second], axis=1), want) < 1e-4
    assert rel_err(end["wkv"], want_state.wkv) < 1e-4
    assert rel_err(end["ffn_shift"], want_state.ffn_shift) < 1e-4


def test_bad_input_is_refused(small):
    _, _, params = small
    with pytest.raises(RwkvkitError, match="token ids"):
        jrwkv7.forward(params, jnp.array([[0, 97]], jnp.int32))
    v6 = random_state_dict("6", n_layer=1)
    with pytest.raises(RwkvkitError, match="RWKV-7"):
        jrwkv7.params_from_checkpoint(v6)


def demo_shape_state_dict() -> dict[str, torch.Tensor]:
    """Fresh random weights of the demo model's shape (rwkvkit/demo: L4, C128, head 32, byte vocab)."""
    shape = new_shape(128, 32)
    widths = {k: shape[k] for k in ("d_decay", "d_iclr", "d_value", "d_gate")}
    return random_state_dict("7", n_layer=4, n_embd=128, head_size=32, vocab_size=256, seed=7, **widths)


def test_jitted_training_step_matches_torch_autograd():
    sd = demo_shape_state_dict()
    batch = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(1))
    x, y = batch[:, :-1], batch[:, 1:]

    model = model_from_state_dict({k: v.clone() for k, v in sd.items()}).train()
    logits, _ = model(x)
    want_loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    want_loss.backward()
    probe = "blocks.1.att.w1"  # the decay LoRA: its gradient passes through the WKV's backward
    want_grad = dict(model.named_parameters())[probe].grad

    def loss_fn(params, x, y):
        logits, _ = jrwkv7.forward(params, x)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, y[..., None], axis=-1).mean()

    @jax.jit
    def sgd_step(params, x, y, lr=0.1):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return loss, grads, jax.tree.map(lambda p, g: p - lr * g, params, grads)

    params = jrwkv7.params_from_checkpoint(sd)
    xj, yj = jnp.asarray(x.numpy(), jnp.int32), jnp.asarray(y.numpy(), jnp.int32)
    loss, grads, new_params = sgd_step(params, xj, yj)
    assert abs(float(loss) - want_loss.item()) / want_loss.item() < 1e-4
    assert rel_err(grads[probe], want_grad) < 1e-4
    assert rel_err(grads["head.weight"], model.head.weight.grad) < 1e-4
    assert rel_err(new_params[probe], params[probe] - 0.1 * want_grad.numpy()) < 1e-6
    loss2, _, _ = sgd_step(new_params, xj, yj)
    assert float(loss2) < float(loss)  # the step went downhill
