"""The RWKV-6 WKV operator as a Keras op on any backend, and the seed's call signatures on top of it.

This module owns three things:

* :func:`wkv6` — rwkvkit's contract (``rwkvkit.wkv.wkv6``: r, w, k, v (B, T, H, N), w the LOG decay,
  u (H, N), state (B, H, N, N) [value, key] float32, final state always returned), dispatched on
  ``keras.backend.backend()`` at call time: jax -> ``rwkvkit.jax.wkv6`` (chunked), torch ->
  ``rwkvkit.wkv.wkv6`` (chunked), any other backend (tensorflow) or ``impl="keras"`` ->
  :func:`wkv6_keras`.
* :func:`wkv6_keras` — a chunk-parallel form written in ``keras.ops`` only, trainable by the backend's
  autodiff. Inside a chunk every decay factor is ``exp`` of a masked difference of cumulative log decays
  (never a ratio of two products), so it is exact for strong decays; the state is carried across chunks
  by one ``keras.ops.scan`` (no Python loop over T). Memory: B*H*T*chunk_size*N floats for the
  intra-chunk weights.
* :func:`rwkv6_op`, :class:`RWKVKernelOperator`, :func:`get_rwkv6_kernel` — the call signatures of
  ``rwkv_ops`` (0.11.3) / bert4keras3, mapped onto :func:`wkv6` (see :func:`rwkv6_op` for the mapping),
  so a Keras user of the seed switches with one import.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import keras
import numpy as np
from keras import ops

from rwkvkit.errors import RwkvkitError

Tensor = Any  # a backend tensor (jax.Array, torch.Tensor, tf.Tensor)

DEFAULT_CHUNK_SIZE = 16
IMPLS = (None, "native", "keras")


def _float_dtype(dtype: Any) -> str:
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def _check_map(state_map: Tensor, n_state: int, batch: int) -> None:
    """Refuse a state_map that is not (B,) integers in [0, n_state), when its values are concrete."""
    if tuple(ops.shape(state_map)) != (batch,):
        raise RwkvkitError(
            f"state_map must have shape ({batch},), one index per row, got {ops.shape(state_map)}"
        )
    if "int" not in keras.backend.standardize_dtype(state_map.dtype):
        raise RwkvkitError(f"state_map must hold integers (int32), got {state_map.dtype}")
    try:
        values = np.asarray(ops.convert_to_numpy(state_map))
    except Exception:  # traced (jit / tf.function): the values are not known here
        return
    bad = np.flatnonzero((values < 0) | (values >= n_state))
    if bad.size:
        row = int(bad[0])
        raise RwkvkitError(f"state_map[{row}] = {int(values[row])} is outside the state bank [0, {n_state})")


def initial_state(
    state: Tensor | None, state_map: Tensor | None, shape: tuple[int, int, int], dtype: str
) -> Tensor:
    """The (B, H, N, N) initial state for inputs of ``shape`` = (B, H, N): zeros (None), per row
    (B, H, N, N), shared (1, H, N, N) or a bank (n_state, H, N, N) picked by ``state_map`` (B,)."""
    B, H, N = shape
    if state is None:
        if state_map is not None:
            raise RwkvkitError("state_map was given without a state bank (state)")
        return ops.zeros((B, H, N, N), dtype)
    state = ops.cast(state, dtype)
    if len(state.shape) != 4 or tuple(state.shape[1:]) != (H, N, N):
        raise RwkvkitError(f"state must be (*, {H}, {N}, {N}), got {tuple(state.shape)}")
    if state_map is not None:
        _check_map(state_map, state.shape[0], B)
        return ops.take(state, state_map, axis=0)
    if state.shape[0] == B:
        return state
    if state.shape[0] == 1:
        return ops.broadcast_to(state, (B, H, N, N))
    raise RwkvkitError(
        f"state has {state.shape[0]} rows for a batch of {B}: give one per row, one shared (1, H, N, N), "
        "or a bank with state_map (B,)"
    )


def wkv6_keras(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[Tensor, Tensor]:
    """The chunk-parallel RWKV-6 in keras.ops: r, w (log decay), k, v (B, T, H, N), u (H, N), state
    (B, H, N, N) [value, key] -> y (B, T, H, N) in r's dtype, final state (B, H, N, N)."""
    B, T, H, N = r.shape
    L = chunk_size
    nc = -(-T // L)
    dtype = _float_dtype(r.dtype)
    pad = nc * L - T  # padded steps: k = v = r = 0 and w = 0, so they leave the state as it is

    def chunks(x: Tensor) -> Tensor:  # (B, T, H, N) -> (B, H, nc, L, N)
        x = ops.cast(x, dtype)
        if pad:
            x = ops.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)])
        return ops.transpose(ops.reshape(x, (B, nc, L, H, N)), (0, 3, 1, 2, 4))

    rc, wc, kc, vc = chunks(r), chunks(w), chunks(k), chunks(v)
    cum = ops.cumsum(wc, axis=-2)  # (B, H, nc, L, N) inclusive: sum_{q <= t} w_q
    exc = cum - wc  # exclusive: sum_{q < t} w_q
    last = cum[..., -1:, :]  # (B, H, nc, 1, N) the whole chunk's log decay

    lower = np.tril(np.ones((L, L), dtype=bool), -1)  # [t, s]: s < t
    mask = ops.convert_to_tensor(lower[:, :, None])  # (L, L, 1)
    diff = exc[..., :, None, :] - cum[..., None, :, :]  # (B, H, nc, L, L, N) = sum_{s < q < t} w_q <= 0
    decay = ops.where(mask, ops.exp(ops.where(mask, diff, 0.0)), 0.0)
    att = ops.sum(rc[..., :, None, :] * kc[..., None, :, :] * decay, axis=-1)  # (B, H, nc, L, L)
    u_b = ops.reshape(ops.cast(u, dtype), (1, H, 1, 1, N))
    bonus = ops.sum(rc * u_b * kc, axis=-1, keepdims=True)  # (B, H, nc, L, 1)
    y = ops.matmul(att, vc) + bonus * vc  # (B, H, nc, L, N)

    # Each chunk's own contribution to the state at its end, and its decay.
    k_end = kc * ops.exp(last - cum)  # (B, H, nc, L, N)
    own = ops.matmul(ops.swapaxes(vc, -1, -2), k_end)  # (B, H, nc, N_v, N_k)
    gain = ops.exp(last[..., 0, :])  # (B, H, nc, N)

    def step(s: Tensor, xs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        g, d = xs  # (B, H, N), (B, H, N, N)
        return s * g[:, :, None, :] + d, s

    xs = (ops.transpose(gain, (2, 0, 1, 3)), ops.transpose(own, (2, 0, 1, 3, 4)))
    final, starts = ops.scan(step, ops.cast(state, dtype), xs)  # starts (nc, B, H, N, N)
    starts = ops.transpose(starts, (1, 2, 0, 3, 4))  # (B, H, nc, N_v, N_k)
    y = y + ops.matmul(rc * ops.exp(exc), ops.swapaxes(starts, -1, -2))
    y = ops.reshape(ops.transpose(y, (0, 2, 3, 1, 4)), (B, nc * L, H, N))[:, :T]
    return ops.cast(y, r.dtype), final


def wkv6(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    state_map: Tensor | None = None,
    *,
    impl: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV on the current Keras backend, rwkvkit's contract (see the module docstring).

    Args:
        r, w, k, v: (B, T, H, N); w is the LOG of the per-step decay (w <= 0).
        u: (H, N) the current token's bonus (time_faaaa).
        state: None, (B, H, N, N), (1, H, N, N) shared, or a bank (n_state, H, N, N) with ``state_map``;
            [value, key].
        state_map: (B,) int32 index into the bank, or None.
        impl: None / "native" (rwkvkit.jax on jax, rwkvkit.wkv on torch, keras.ops elsewhere) or
            "keras" (the keras.ops form on any backend).
        chunk_size: chunk length of the chunked forms.
    Returns:
        y (B, T, H, N) in r's dtype, final state (B, H, N, N) float32 (float64 for float64 r).
    """
    if impl not in IMPLS:
        raise RwkvkitError(f"impl must be one of {IMPLS}, got {impl!r}")
    if len(r.shape) != 4 or tuple(u.shape) != tuple(r.shape[2:]):
        raise RwkvkitError(f"r must be (B, T, H, N) and u (H, N), got {tuple(r.shape)} and {tuple(u.shape)}")
    backend = keras.backend.backend()
    if impl is None or impl == "native":
        if backend == "jax":
            from rwkvkit.jax.wkv6 import wkv6 as jax_wkv6  # the backend's own op, imported only on it

            return jax_wkv6(r, w, k, v, u, state, state_map, impl="chunked", chunk_size=chunk_size)
        if backend == "torch":
            from rwkvkit.wkv import wkv6 as torch_wkv6  # the backend's own op, imported only on it

            B, _, H, N = r.shape
            s0 = initial_state(state, state_map, (B, H, N), _float_dtype(r.dtype))
            return torch_wkv6(r, w, k, v, u, s0, impl="chunked", chunk_size=chunk_size)
    B, _, H, N = r.shape
    s0 = initial_state(state, state_map, (B, H, N), _float_dtype(r.dtype))
    return wkv6_keras(r, w, k, v, u, s0, chunk_size)


# --- the seed's signatures (rwkv_ops 0.11.3 / bert4keras3) ---------------------------------------------


def _seed_call(r, k, v, w, u, init_state, state_map, head_size, head_first, impl):
    """rwkv_ops semantics -> wkv6: (y in the seed's layout, final state [key, value] float32)."""
    if head_first:  # (B, H, T, N) -> (B, T, H, N)
        r, k, v, w = (ops.transpose(x, (0, 2, 1, 3)) for x in (r, k, v, w))
        B, T, H, N = r.shape
    else:
        B, T, C = r.shape
        if C % head_size:
            raise RwkvkitError(f"the channel count C = {C} is not a multiple of head_size = {head_size}")
        H, N = C // head_size, head_size
        r, k, v, w = (ops.reshape(x, (B, T, H, N)) for x in (r, k, v, w))
    if int(np.prod(u.shape)) != H * N:
        raise RwkvkitError(f"u must be (H, N) = ({H}, {N}) or (C,) = ({H * N},), got {tuple(u.shape)}")
    u = ops.reshape(u, (H, N))
    log_w = -ops.exp(ops.cast(w, _float_dtype(r.dtype)))  # the seed's decay is exp(-exp(w))
    state = None
    if init_state is not None:
        if len(init_state.shape) == 3:  # (H, N, N): one state for every row
            init_state = init_state[None]
        state = ops.swapaxes(ops.cast(init_state, "float32"), -1, -2)  # [key, value] -> [value, key]
        if state_map is None and state.shape[0] not in (1, B):
            raise RwkvkitError(
                f"init_state has {state.shape[0]} states for a batch of {B}: give state_map (B,)"
            )
        if state_map is not None:
            state_map = ops.cast(ops.convert_to_tensor(state_map), "int32")
    elif state_map is not None:
        raise RwkvkitError("state_map was given without init_state")
    y, final = wkv6(r, log_w, k, v, u, state, state_map, impl=impl)
    y = ops.transpose(y, (0, 2, 1, 3)) if head_first else ops.reshape(y, (B, T, H * N))
    return y, ops.swapaxes(final, -1, -2)


def rwkv6_op(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    state_map: Tensor | None = None,
    head_size: int = 64,
    max_sequence_length: int = 4096,
    head_first: bool = False,
    *,
    impl: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``from rwkv_ops import rwkv6_op`` with rwkvkit underneath (rwkv_ops 0.11.3's signature).

    The mapping, from the seed's arguments to :func:`wkv6`:

    * r, k, v, w: (B, T, C) with C = H * head_size (or (B, H, T, N) with ``head_first``), reshaped to
      (B, T, H, N); note the seed's argument order r, k, v, w, u.
    * w is the seed's raw decay parameter: the per-step decay is exp(-exp(w)), so rwkvkit's log decay
      is -exp(w), computed in float32.
    * u: (H, N) or (C,), reshaped to (H, N).
    * initial_state: (n_state, H, N, N) or (H, N, N), laid out [key, value] as in the seed (transposed to
      rwkvkit's [value, key] and back for the final state). Without ``state_map`` n_state must be 1
      (shared by every row) or B (one each); with it, n_state is any bank size and ``state_map`` (B,)
      picks each row's state (n_state = 1 with a map of zeros works too). ``state_map`` without
      ``initial_state`` is refused, as in the seed.
    * returns y (B, T, C) (or (B, H, T, N)) in r's dtype, and with ``output_final_state`` also the final
      state (B, H, N, N) float32 [key, value].

    ``max_sequence_length`` is accepted and ignored (rwkvkit's forms have no length limit). Gradients flow
    to r, k, v, w, u and to ``initial_state`` (state tuning), which the seed's CUDA kernels do not give.
    """
    del max_sequence_length
    y, final = _seed_call(r, k, v, w, u, initial_state, state_map, head_size, head_first, impl)
    return (y, final) if output_final_state else y


def get_rwkv6_kernel(HEAD_SIZE: int = 64, KERNEL_TYPE: str = "native", MAX_SEQUENCE_LENGTH: int = 4096):  # noqa: N803
    """``rwkv_ops.get_rwkv6_kernel``: :func:`rwkv6_op` with ``head_size`` bound (KERNEL_TYPE ignored)."""
    del KERNEL_TYPE
    return partial(rwkv6_op, head_size=HEAD_SIZE, max_sequence_length=MAX_SEQUENCE_LENGTH)


class RWKVKernelOperator:
    """``rwkv_ops``' / bert4keras3's operator object: ``op(r, k, v, w, u, with_state=False,
    init_state=None, state_map=None) -> (y, final_state or None)``, the mapping of :func:`rwkv6_op`."""

    def __init__(self, head_size: int, max_sequence_length: int = 4096, *, impl: str | None = None):
        self.head_size = head_size
        self.max_sequence_length = max_sequence_length
        self.impl = impl

    def __call__(
        self,
        r: Tensor,
        k: Tensor,
        v: Tensor,
        w: Tensor,
        u: Tensor,
        with_state: bool = False,
        init_state: Tensor | None = None,
        state_map: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        y, final = _seed_call(r, k, v, w, u, init_state, state_map, self.head_size, False, self.impl)
        return y, (final if with_state else None)
