"""Child process of tests/test_keras.py: runs rwkvkit.keras under the KERAS_BACKEND of its environment.

Usage: ``KERAS_BACKEND=jax python tests/keras_child.py IN.npz OUT.npz``. Reads the inputs, writes the
layer's outputs and gradients (backend autodiff), the seed adapters' outputs on every state mode and the
losses of a short ``fit``; the parent compares them with its own references (it never imports keras).
"""

from __future__ import annotations

import sys

import keras
import numpy as np
from keras import ops

from rwkvkit.errors import RwkvkitError
from rwkvkit.keras import WKV6, RWKVKernelOperator, rwkv6_op

BACKEND = keras.backend.backend()


def layer_grads(x: dict, impl: str | None) -> dict:
    """y, final state and the gradients of sum(y * gy) + sum(final * gs) for the WKV6 layer."""
    B, T, C = x["r"].shape
    H, N = x["u"].shape
    layer = WKV6(H, N, decay="raw", return_state=True, impl=impl, chunk_size=8)
    layer.u.assign(x["u"])
    names = ("r", "k", "v", "w", "s")
    if BACKEND == "jax":
        import jax

        def loss(u, r, k, v, w, s):
            (y, final), _ = layer.stateless_call([u], [], r, k, v, w, initial_state=s)
            return ops.sum(y * x["gy"]) + ops.sum(final * x["gs"]), (y, final)

        args = [x["u"]] + [x[n] for n in names]
        grads, (y, final) = jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(*args)
        out = {"du": grads[0], **{f"d{n}": g for n, g in zip(names, grads[1:], strict=True)}}
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        ts = {n: tf.Variable(x[n]) for n in names}
        with tf.GradientTape() as tape:
            y, final = layer(ts["r"], ts["k"], ts["v"], ts["w"], initial_state=ts["s"])
            loss = tf.reduce_sum(y * x["gy"]) + tf.reduce_sum(final * x["gs"])
        grads = tape.gradient(loss, [layer.u.value] + [ts[n] for n in names])
        out = {"du": grads[0], **{f"d{n}": g for n, g in zip(names, grads[1:], strict=True)}}
    else:
        import torch

        ts = {n: torch.tensor(x[n], requires_grad=True) for n in names}
        y, final = layer(ts["r"], ts["k"], ts["v"], ts["w"], initial_state=ts["s"])
        loss = (y * torch.tensor(x["gy"])).sum() + (final * torch.tensor(x["gs"])).sum()
        loss.backward()
        out = {"du": layer.u.value.grad, **{f"d{n}": ts[n].grad for n in names}}
    out.update(y=y, final=final)
    return {f"layer_{impl}_{n}": ops.convert_to_numpy(a) for n, a in out.items()}


def adapters(x: dict) -> dict:
    """The seed's signatures on every state mode (on jax all under one ``jax.jit``, traced state_map)."""

    def compute(r, k, v, w, u, bank, state_map):  # bank (3, H, N, N) [key, value]
        H, N = u.shape
        B = r.shape[0]
        op = RWKVKernelOperator(N, 4096)
        zeros = ops.zeros((B,), "int32")
        out = {}
        out["plain_y"], out["plain_state"] = op(r, k, v, w, u)
        out["with_state_y"], out["with_state_s"] = op(r, k, v, w, ops.reshape(u, (-1,)), with_state=True)
        out["shared_map_y"], out["shared_map_s"] = rwkv6_op(r, k, v, w, u, bank[:1], True, zeros, head_size=N)
        out["shared3d_y"], out["shared3d_s"] = op(r, k, v, w, u, with_state=True, init_state=bank[0])
        out["per_row_y"], out["per_row_s"] = op(r, k, v, w, u, with_state=True, init_state=bank[:B])
        out["bank_y"], out["bank_s"] = op(r, k, v, w, u, True, bank, state_map)
        out["keras_bank_y"] = rwkv6_op(r, k, v, w, u, bank, state_map=state_map, head_size=N, impl="keras")
        if BACKEND == "jax":
            from rwkvkit.jax import compat

            jop = compat.RWKVKernelOperator(N)
            out["jax_shared_map_y"], out["jax_shared_map_s"] = compat.rwkv6_op(
                r, k, v, w, u, bank[:1], True, zeros, head_size=N
            )
            out["jax_bank_y"], out["jax_bank_s"] = jop(
                r, k, v, w, ops.reshape(u, (-1,)), True, bank, state_map
            )
            out["jax_plain_y"], out["jax_plain_state"] = jop(r, k, v, w, u)
        return out

    if BACKEND == "jax":
        import jax

        compute = jax.jit(compute)
    out = compute(*(ops.convert_to_tensor(x[n]) for n in ("r", "k", "v", "w", "u", "bank", "state_map")))
    out["plain_state_is_none"] = np.array(out.pop("plain_state") is None)
    if BACKEND == "jax":
        out["jax_plain_state_is_none"] = np.array(out.pop("jax_plain_state") is None)
    return {f"adapter_{n}": ops.convert_to_numpy(a) for n, a in out.items()}


def refusals(x: dict) -> dict:
    """The one-line errors for bad input (eager calls): a bank index out of range, C not a multiple of
    head_size, state_map without init_state."""
    r, k, v, w, u, bank = (x[n] for n in ("r", "k", "v", "w", "u", "bank"))
    N = u.shape[1]
    calls = (
        lambda: rwkv6_op(r, k, v, w, u, bank, state_map=np.array([0, 3], np.int32), head_size=N),
        lambda: rwkv6_op(r, k, v, w, u, head_size=N + 1),
        lambda: rwkv6_op(r, k, v, w, u, state_map=np.zeros(2, np.int32), head_size=N),
    )
    messages = []
    for call in calls:
        try:
            call()
            messages.append("no error")
        except (RwkvkitError, ValueError) as e:  # rwkvkit.jax.state raises ValueError
            messages.append(str(e))
    return {"refusals": np.array(messages)}


def fit_losses(x: dict) -> dict:
    """Losses of a tiny Dense -> WKV6 (state bank of 1) -> Dense model over a few train steps."""
    keras.utils.set_random_seed(0)
    B, T, C = x["r"].shape
    H, N = x["u"].shape
    inp = keras.Input((T, C), batch_size=B)
    proj = [keras.layers.Dense(C, name=f"proj_{n}")(inp) for n in "rkvw"]
    wkv = WKV6(H, N, state_bank=1, chunk_size=8, name="wkv")
    out = keras.layers.Dense(C)(wkv(*proj))
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    losses = [float(model.train_on_batch(x["r"], x["v"])) for _ in range(8)]
    bank = ops.convert_to_numpy(model.get_layer("wkv").initial_state)
    return {"fit_losses": np.array(losses), "fit_bank_abs": np.array(np.abs(bank).max())}


def main() -> None:
    x = dict(np.load(sys.argv[1]))
    out = {}
    for impl in (None, "keras"):
        out.update(layer_grads(x, impl))
    out.update(adapters(x))
    out.update(refusals(x))
    out.update(fit_losses(x))
    np.savez(sys.argv[2], **out)


if __name__ == "__main__":
    main()
