"""Initial WKV states for the JAX operators: per row, shared, or a bank indexed by ``state_map``.

This module owns how every ``rwkvkit.jax`` operator turns its ``state`` / ``state_map`` arguments into one
(B, H, N, N) float32 (float64 for float64 inputs) initial state, [value, key] as in ``rwkvkit.wkv``:

    state=None                      zeros
    state (B, H, N, N)              one state per row
    state (1, H, N, N)              one state shared by every row (broadcast, no copy in the graph)
    state (n_state, H, N, N)        a bank, with state_map (B,) int32 picking each row's entry

Gradients flow to ``state`` in every mode, to a bank through the gather (state tuning: the gradient of a
bank entry sums over the rows that used it). A ``state_map`` index outside [0, n_state) is refused:

* with concrete values (outside ``jit``) by a ValueError naming the first bad row;
* under ``jit`` (traced values) the rows with a bad index get NaN states, so their outputs and final
  states are NaN rather than another row's numbers; with ``checked=True`` a host callback also raises
  (the error surfaces from the jitted call as a runtime error naming the row).

RWKV-4's state is three (B, C) vectors, not a matrix: :func:`initial_state_v4` applies the same modes
to each of them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # jax.Array; kept loose so the type hints read the same under jit


def state_dtype(dtype: Any) -> Any:
    """The dtype the recurrence keeps its state in: float64 for float64 inputs, else float32."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _check_map_concrete(state_map: np.ndarray, n_state: int, batch: int) -> None:
    if state_map.shape != (batch,):
        raise ValueError(f"state_map must have shape ({batch},), one index per row, got {state_map.shape}")
    if not np.issubdtype(state_map.dtype, np.integer):
        raise ValueError(f"state_map must hold integers (int32), got {state_map.dtype}")
    bad = np.flatnonzero((state_map < 0) | (state_map >= n_state))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"state_map[{row}] = {int(state_map[row])} is outside the state bank [0, {n_state}) "
            f"({bad.size} bad row(s))"
        )


def _raise_bad_rows(state_map: np.ndarray, n_state: int) -> None:
    _check_map_concrete(np.asarray(state_map), n_state, len(state_map))


def _select(bank: Array, state_map: Array, checked: bool) -> Array:
    """bank[state_map] with out-of-range rows refused (concrete) or NaN (traced)."""
    n_state, batch = bank.shape[0], state_map.shape[0]
    if not isinstance(state_map, jax.core.Tracer):
        _check_map_concrete(np.asarray(state_map), n_state, batch)
        return jnp.take(bank, jnp.asarray(state_map), axis=0)
    if state_map.shape != (batch,) or not jnp.issubdtype(state_map.dtype, jnp.integer):
        raise ValueError(f"state_map must be (B,) integers, got {state_map.shape} {state_map.dtype}")
    if checked:
        jax.debug.callback(_raise_bad_rows, state_map, n_state)
    valid = (state_map >= 0) & (state_map < n_state)  # (B,)
    picked = jnp.take(bank, jnp.clip(state_map, 0, n_state - 1), axis=0)
    poison = jnp.where(valid, 0.0, jnp.nan).astype(bank.dtype)
    return picked + poison.reshape((batch,) + (1,) * (bank.ndim - 1))


def initial_state(
    state: Array | None,
    state_map: Array | None,
    shape: tuple[int, int, int],
    dtype: Any,
    checked: bool = False,
) -> Array:
    """The (B, H, N, N) initial state of a matrix-state operator (RWKV-5.2 / 6 / 7) with inputs of
    ``shape`` = (B, H, N) and ``dtype``; see the module docstring for the modes."""
    B, H, N = shape
    sdtype = state_dtype(dtype)
    if state is None:
        if state_map is not None:
            raise ValueError("state_map was given without a state bank (state)")
        return jnp.zeros((B, H, N, N), sdtype)
    state = jnp.asarray(state)
    if state.ndim != 4 or state.shape[1:] != (H, N, N):
        raise ValueError(f"state must be (B, H, N, N) = (*, {H}, {N}, {N}), got {tuple(state.shape)}")
    state = state.astype(sdtype)
    if state_map is not None:
        return _select(state, state_map, checked)
    if state.shape[0] == B:
        return state
    if state.shape[0] == 1:
        return jnp.broadcast_to(state, (B, H, N, N))
    raise ValueError(
        f"state has {state.shape[0]} rows for a batch of {B}: give one per row, one shared (1, H, N, N), "
        "or a bank with state_map (B,) picking each row's entry"
    )


def initial_state_v4(
    state: tuple[Array, Array, Array] | None,
    state_map: Array | None,
    shape: tuple[int, int],
    dtype: Any,
    checked: bool = False,
) -> tuple[Array, Array, Array]:
    """RWKV-4's (aa, bb, pp) initial state, each (B, C), with inputs of ``shape`` = (B, C): zeros and
    pp = -1e38 for None; per row, shared (1, C) or a bank (n_state, C) with ``state_map``."""
    B, C = shape
    sdtype = state_dtype(dtype)
    if state is None:
        if state_map is not None:
            raise ValueError("state_map was given without a state bank (state)")
        zeros = jnp.zeros((B, C), sdtype)
        return zeros, zeros, jnp.full((B, C), -1e38, sdtype)
    if len(state) != 3:
        raise ValueError(f"an RWKV-4 state is (aa, bb, pp), got {len(state)} arrays")
    parts = []
    for part in state:
        part = jnp.asarray(part).astype(sdtype)
        if part.ndim != 2 or part.shape[1] != C:
            raise ValueError(f"each RWKV-4 state array must be (*, {C}), got {tuple(part.shape)}")
        if state_map is not None:
            part = _select(part, state_map, checked)
        elif part.shape[0] == 1:
            part = jnp.broadcast_to(part, (B, C))
        elif part.shape[0] != B:
            raise ValueError(f"state has {part.shape[0]} rows for a batch of {B} (use state_map for a bank)")
        parts.append(part)
    return tuple(parts)
