"""Data-parallel WKV-7 with ``jax.shard_map``: the batch split over the devices of a 1-D mesh.

Run on CPU with four simulated devices (the flag must be set before jax is imported):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/jax_shard_map.py

Each device runs rwkvkit.jax.wkv7 on its rows with its rows' initial states; the output, the final
states and the gradients equal the single-device call. A bank of states picked by ``state_map`` is kept
whole on every device (replicated) and each device gathers its own rows' entries. One state shared by
every row (1, H, N, N), replicated, must be marked varying inside the mapped function before the call,
``state = jax.lax.pcast(state, ("data",), to="varying")``, or the chunked scan refuses its carry.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

from rwkvkit.jax.wkv7 import wkv7  # noqa: E402

B, T, H, N = 8, 64, 2, 16  # the batch B must divide by the number of devices


def inputs(key: jax.Array) -> tuple[jax.Array, ...]:
    """Random r, w, k, v, a, b (B, T, H, N) shaped like RWKV-7's, and per-row states (B, H, N, N)."""
    ks = jax.random.split(key, 5)
    r, k, v = (jax.random.normal(ks[i], (B, T, H, N)) for i in range(3))
    w = -jnp.exp(-0.5) * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H, N)))  # log decay
    kk = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    state = 0.1 * jax.random.normal(ks[4], (B, H, N, N))
    return r, w, k, v, -kk, 0.5 * kk, state


def main() -> None:
    mesh = Mesh(jax.devices(), ("data",))
    rows = PartitionSpec("data")  # split axis 0 (the batch) over the mesh
    r, w, k, v, a, b, state = inputs(jax.random.key(0))

    sharded = jax.jit(
        jax.shard_map(
            lambda *xs: wkv7(*xs[:6], xs[6]), mesh=mesh, in_specs=(rows,) * 7, out_specs=(rows, rows)
        )
    )
    y, final = sharded(r, w, k, v, a, b, state)
    y1, final1 = wkv7(r, w, k, v, a, b, state)
    print(f"{len(jax.devices())} devices; y {y.shape} sharded as {y.sharding.spec}")
    y_err, state_err = float(jnp.abs(y - y1).max()), float(jnp.abs(final - final1).max())
    print(f"max |y - unsharded| {y_err:.1e}, final state {state_err:.1e}")

    # gradients through the sharded call
    def loss(fn, *xs):
        y, s = fn(*xs)
        return (y**2).sum() + s.sum()

    g = jax.grad(lambda *xs: loss(sharded, *xs), argnums=(0, 6))(r, w, k, v, a, b, state)
    g1 = jax.grad(lambda *xs: loss(wkv7, *xs), argnums=(0, 6))(r, w, k, v, a, b, state)
    print(f"max |grad r - unsharded| {float(jnp.abs(g[0] - g1[0]).max()):.1e}")

    # a bank of 3 states, replicated; state_map (B,) sharded with the rows
    bank, state_map = state[:3], jnp.arange(B, dtype=jnp.int32) % 3
    banked = jax.jit(
        jax.shard_map(
            lambda *xs: wkv7(*xs[:6], xs[6], xs[7]),
            mesh=mesh,
            in_specs=(rows,) * 6 + (PartitionSpec(), rows),
            out_specs=(rows, rows),
        )
    )
    y, _ = banked(r, w, k, v, a, b, bank, state_map)
    y1, _ = wkv7(r, w, k, v, a, b, bank, state_map)
    print(f"bank + state_map: max |y - unsharded| {float(jnp.abs(y - y1).max()):.1e}")


if __name__ == "__main__":
    main()
