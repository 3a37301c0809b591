"""A pure-JAX RWKV-7 forward over the official checkpoint layout (extra: ``pip install 'rwkvkit[jax]'``).

This module owns the JAX form of :mod:`rwkvkit.models.rwkv7` (same equations, same weights): loading a
checkpoint into a pytree and the whole-sequence forward with a carried state, jit-able and
differentiable. The WKV runs through :func:`rwkvkit.jax.wkv7.wkv7` (chunked).

    params = params_from_checkpoint("model.pth")        # {official key: jax array}, fp32
    logits, state = forward(params, tokens)              # tokens (B, T) int32 -> logits (B, T, V) fp32
    logits2, state = forward(params, more_tokens, state) # continue the same sequences

``state`` is a dict like :class:`rwkvkit.state.RWKVState`: ``att_shift`` (L, B, C), ``wkv`` (L, B, H, N, N)
fp32 [value, key], ``ffn_shift`` (L, B, C). None starts fresh sequences (zero shifts; each layer's wkv state
is its tuned ``att.time_state`` when the checkpoint has one, else zeros).

rwkvkit's torch model scales each sub-block's output by 2^-(layer // 6) and back (fp16 headroom); in
fp32 that is exact, so it is left out here.

Legend: B batch, T time, C = n_embd, H heads, N head size, F ffn width, V vocab, L layers.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwkvkit.errors import RwkvkitError
from rwkvkit.jax.wkv7 import wkv7

__all__ = ["forward", "model_shape", "params_from_checkpoint", "zero_state"]

Array = Any  # jax.Array
Params = dict[str, Array]
LOG_DECAY_SCALE = math.exp(-0.5)  # log decay = -exp(-0.5) * sigmoid(z), in (-0.61, 0)
LAYER_NORM_EPS = 1e-5
GROUPNORM_EPS = 64e-5  # ln_x, as rwkvkit.models.layers.GROUPNORM_EPS


def params_from_checkpoint(path_or_state_dict: str | os.PathLike | dict) -> Params:
    """An RWKV-7 checkpoint (a path rwkvkit can load, or a state dict of torch tensors) as a flat
    ``{official key: float32 jax array}`` pytree, checked by rwkvkit's loader (keys and shapes)."""
    import torch  # torch and rwkvkit's loader only when a checkpoint is read: the forward is pure JAX

    # rwkvkit's loader (imports torch) only when a checkpoint is read
    from rwkvkit.checkpoint import load_state_dict
    from rwkvkit.models import check_state_dict

    if isinstance(path_or_state_dict, dict):
        sd = path_or_state_dict
    else:
        sd = load_state_dict(path_or_state_dict)
    config = check_state_dict(sd)
    if config.version != "7":
        raise RwkvkitError(f"rwkvkit.jax.rwkv7 runs RWKV-7 checkpoints, this one is RWKV-{config.version}")
    return {k: jnp.asarray(v.detach().to(torch.float32).cpu().numpy()) for k, v in sd.items()}


def model_shape(params: Params) -> tuple[int, int, int, int]:
    """(L, C, H, N) of an RWKV-7 pytree."""
    L = 1 + max(int(k.split(".")[1]) for k in params if k.startswith("blocks."))
    H, N = params["blocks.0.att.r_k"].shape
    return L, H * N, H, N


def zero_state(params: Params, batch_size: int) -> dict[str, Array]:
    """The state of ``batch_size`` fresh sequences (see the module docstring: tuned states included)."""
    L, C, H, N = model_shape(params)
    wkv = []
    for i in range(L):
        tuned = params.get(f"blocks.{i}.att.time_state")  # (H, N, N) or None
        wkv.append(
            jnp.zeros((batch_size, H, N, N))
            if tuned is None
            else jnp.broadcast_to(tuned, (batch_size, H, N, N))
        )
    zeros = jnp.zeros((L, batch_size, C), jnp.float32)
    return {"att_shift": zeros, "wkv": jnp.stack(wkv).astype(jnp.float32), "ffn_shift": zeros}


def _layer_norm(x: Array, weight: Array, bias: Array) -> Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS) * weight + bias


def _shifted(x: Array, prev: Array) -> Array:
    """x (B, T, C) one step back in time, ``prev`` (B, C) before x[:, 0]."""
    return jnp.concatenate([prev[:, None], x[:, :-1]], axis=1)


def _time_mix(p: Params, i: int, x: Array, shift: Array, S: Array, v_first: Array | None, H: int):
    """RWKV-7 time mix of layer i on x (B, T, C) normalised: (out, new wkv state, v_first)."""
    B, T, C = x.shape
    N = C // H
    a = f"blocks.{i}.att."
    xx = _shifted(x, shift) - x
    xr, xw, xk, xv, xa, xg = (x + xx * p[a + name] for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
    r, k, v = xr @ p[a + "receptance.weight"].T, xk @ p[a + "key.weight"].T, xv @ p[a + "value.weight"].T
    log_decay = jax.nn.sigmoid(p[a + "w0"] + jnp.tanh(xw @ p[a + "w1"]) @ p[a + "w2"]) * -LOG_DECAY_SCALE
    iclr = jax.nn.sigmoid(p[a + "a0"] + (xa @ p[a + "a1"]) @ p[a + "a2"])  # (B, T, C)
    g = jax.nn.sigmoid(xg @ p[a + "g1"]) @ p[a + "g2"]
    kk = (k * p[a + "k_k"]).reshape(B, T, H, N)
    kk = kk / jnp.maximum(jnp.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)  # as F.normalize
    k = k * (1 + (iclr - 1) * p[a + "k_a"])
    if v_first is None:
        v_first = v
    else:
        v = v + (v_first - v) * jax.nn.sigmoid(p[a + "v0"] + (xv @ p[a + "v1"]) @ p[a + "v2"])
    rh, kh, vh = (t.reshape(B, T, H, N) for t in (r, k, v))
    heads = (log_decay.reshape(B, T, H, N), -kk, kk * iclr.reshape(B, T, H, N))
    y, S = wkv7(rh, heads[0], kh, vh, heads[1], heads[2], S, impl="chunked")  # y (B, T, H, N)
    mean = y.mean(-1, keepdims=True)
    var = ((y - mean) ** 2).mean(-1, keepdims=True)
    y = ((y - mean) * jax.lax.rsqrt(var + GROUPNORM_EPS)).reshape(B, T, C)
    y = y * p[a + "ln_x.weight"] + p[a + "ln_x.bias"]
    bonus = (rh * kh * p[a + "r_k"]).sum(-1, keepdims=True) * vh  # (B, T, H, N)
    y = y + bonus.reshape(B, T, C)
    return (y * g) @ p[a + "output.weight"].T, S, v_first


def _channel_mix(p: Params, i: int, x: Array, shift: Array) -> Array:
    f = f"blocks.{i}.ffn."
    xk = x + (_shifted(x, shift) - x) * p[f + "x_k"]
    k = jax.nn.relu(xk @ p[f + "key.weight"].T)  # (B, T, F)
    return (k * k) @ p[f + "value.weight"].T


def forward(params: Params, tokens: Array, state: dict[str, Array] | None = None) -> tuple[Array, dict]:
    """Run tokens (B, T) int from ``state`` (None: fresh sequences). Returns (logits (B, T, V) fp32, the
    new state). Jit-able (``jax.jit(forward)``) and differentiable in ``params`` and ``state``."""
    if not isinstance(tokens, jax.core.Tracer):
        tokens_np = np.asarray(tokens)
        if tokens_np.ndim != 2 or tokens_np.size == 0:
            raise RwkvkitError(
                f"tokens must be a non-empty (B, T) integer array, got shape {tokens_np.shape}"
            )
        V = params["emb.weight"].shape[0]
        if tokens_np.min() < 0 or tokens_np.max() >= V:
            raise RwkvkitError(f"token ids must be in [0, {V}), got {tokens_np.min()}..{tokens_np.max()}")
    L, C, H, N = model_shape(params)
    B = tokens.shape[0]
    if state is None:
        state = zero_state(params, B)
    x = params["emb.weight"][tokens]  # (B, T, C)
    x = _layer_norm(x, params["blocks.0.ln0.weight"], params["blocks.0.ln0.bias"])
    att_shift, wkv, ffn_shift = [], [], []
    v_first = None
    for i in range(L):
        b = f"blocks.{i}."
        xa = _layer_norm(x, params[b + "ln1.weight"], params[b + "ln1.bias"])
        out, S, v_first = _time_mix(params, i, xa, state["att_shift"][i], state["wkv"][i], v_first, H)
        x = x + out
        xf = _layer_norm(x, params[b + "ln2.weight"], params[b + "ln2.bias"])
        x = x + _channel_mix(params, i, xf, state["ffn_shift"][i])
        att_shift.append(xa[:, -1])
        wkv.append(S)
        ffn_shift.append(xf[:, -1])
    logits = _layer_norm(x, params["ln_out.weight"], params["ln_out.bias"]) @ params["head.weight"].T
    new_state = {"att_shift": jnp.stack(att_shift), "wkv": jnp.stack(wkv), "ffn_shift": jnp.stack(ffn_shift)}
    return logits, new_state
