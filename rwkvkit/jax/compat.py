"""The seed's RWKV-6 call signatures for JAX (rwkv_ops 0.11.3 / bert4keras3), on top of rwkvkit.jax.wkv6.

Switching is one import: ``from rwkvkit.jax.compat import rwkv6_op`` (or ``RWKVKernelOperator``,
``get_rwkv6_kernel``) in place of ``from rwkv_ops import ...``. The mapping onto
``rwkvkit.jax.wkv6.wkv6(r, w, k, v, u, state, state_map)``:

* r, k, v, w: (B, T, C), C = H * head_size (or (B, H, T, N) with ``head_first``) -> (B, T, H, N); the
  seed's argument order is r, k, v, w, u.
* w is the seed's raw decay parameter (decay = exp(-exp(w))): rwkvkit's log decay is -exp(w), float32.
* u: (H, N) or (C,) -> (H, N).
* initial_state: (n_state, H, N, N) or (H, N, N), laid out [key, value] like the seed; transposed to
  rwkvkit's [value, key] (and the final state back). Without ``state_map``: n_state = 1 shared by every
  row, or n_state = B one each. With ``state_map`` (B,) int32: any bank, n_state = 1 included (a map of
  zeros), under ``jit`` too. ``state_map`` without ``initial_state`` is refused, as in the seed.
* returns y in the input layout and r's dtype; the final state (B, H, N, N) float32 [key, value] when
  ``output_final_state`` (``rwkv6_op``) / ``with_state`` (the operator; else None).

Unlike the seed's CUDA path nothing is cast to bfloat16, there is no maximum length
(``max_sequence_length`` is accepted and ignored), and gradients reach ``initial_state``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax.numpy as jnp

from rwkvkit.errors import RwkvkitError

Array = Any


def _seed_call(r, k, v, w, u, init_state, state_map, head_size, head_first):
    """rwkv_ops semantics -> rwkvkit.jax.wkv6: (y in the seed's layout, final state [key, value])."""
    from rwkvkit.jax.wkv6 import wkv6  # here: importing the adapter module stays cheap

    r, k, v, w = (jnp.asarray(x) for x in (r, k, v, w))
    if head_first:  # (B, H, T, N) -> (B, T, H, N)
        r, k, v, w = (jnp.swapaxes(x, 1, 2) for x in (r, k, v, w))
        B, T, H, N = r.shape
    else:
        B, T, C = r.shape
        if C % head_size:
            raise RwkvkitError(f"the channel count C = {C} is not a multiple of head_size = {head_size}")
        H, N = C // head_size, head_size
        r, k, v, w = (x.reshape(B, T, H, N) for x in (r, k, v, w))
    u = jnp.asarray(u)
    if u.size != H * N:
        raise RwkvkitError(f"u must be (H, N) = ({H}, {N}) or (C,) = ({H * N},), got {tuple(u.shape)}")
    u = u.reshape(H, N).astype(r.dtype)
    sdtype = jnp.float64 if r.dtype == jnp.float64 else jnp.float32
    log_w = -jnp.exp(w.astype(sdtype))  # the seed's decay is exp(-exp(w))
    state = None
    if init_state is not None:
        init_state = jnp.asarray(init_state)
        if init_state.ndim == 3:  # (H, N, N): one state for every row
            init_state = init_state[None]
        state = jnp.swapaxes(init_state.astype(sdtype), -1, -2)  # [key, value] -> [value, key]
        if state_map is None and state.shape[0] not in (1, B):
            raise RwkvkitError(
                f"init_state has {state.shape[0]} states for a batch of {B}: give state_map (B,)"
            )
        if state_map is not None:
            state_map = jnp.asarray(state_map).astype(jnp.int32)
    elif state_map is not None:
        raise RwkvkitError("state_map was given without init_state")
    y, final = wkv6(r, log_w, k, v, u, state, state_map, impl="chunked")
    y = jnp.swapaxes(y, 1, 2) if head_first else y.reshape(B, T, H * N)
    return y, jnp.swapaxes(final, -1, -2)


def rwkv6_op(
    r: Array,
    k: Array,
    v: Array,
    w: Array,
    u: Array,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    state_map: Array | None = None,
    head_size: int = 64,
    max_sequence_length: int = 4096,
    head_first: bool = False,
) -> Array | tuple[Array, Array]:
    """``rwkv_ops.rwkv6_op``: y, or (y, final_state [key, value]) with ``output_final_state``; see the
    module docstring for the mapping."""
    del max_sequence_length
    y, final = _seed_call(r, k, v, w, u, initial_state, state_map, head_size, head_first)
    return (y, final) if output_final_state else y


def get_rwkv6_kernel(HEAD_SIZE: int = 64, KERNEL_TYPE: str = "native", MAX_SEQUENCE_LENGTH: int = 4096):  # noqa: N803
    """``rwkv_ops.get_rwkv6_kernel``: :func:`rwkv6_op` with ``head_size`` bound (KERNEL_TYPE ignored)."""
    del KERNEL_TYPE
    return partial(rwkv6_op, head_size=HEAD_SIZE, max_sequence_length=MAX_SEQUENCE_LENGTH)


class RWKVKernelOperator:
    """The seed's operator object: ``op(r, k, v, w, u, with_state=False, init_state=None,
    state_map=None) -> (y, final_state or None)``."""

    def __init__(self, head_size: int, max_sequence_length: int = 4096):
        self.head_size = head_size
        self.max_sequence_length = max_sequence_length

    def __call__(
        self,
        r: Array,
        k: Array,
        v: Array,
        w: Array,
        u: Array,
        with_state: bool = False,
        init_state: Array | None = None,
        state_map: Array | None = None,
    ) -> tuple[Array, Array | None]:
        y, final = _seed_call(r, k, v, w, u, init_state, state_map, self.head_size, False)
        return y, (final if with_state else None)
