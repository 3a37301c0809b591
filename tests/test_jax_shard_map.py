"""Data parallel rwkvkit.jax operators under ``jax.shard_map`` on 4 simulated CPU devices (a subprocess,
since the device count is fixed when jax starts): outputs, final states and gradients equal the unsharded
call (the step-by-step reference), for per-row, shared and banked (state_map) initial states; WKV-7 and
WKV-6 (when rwkvkit.jax.wkv6 is present)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import functools, importlib.util, json
import jax, jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
from rwkvkit.jax.wkv7 import wkv7

assert len(jax.devices()) == 4, jax.devices()
mesh = Mesh(jax.devices(), ("data",))
B, T, H, N = 8, 24, 2, 8
ks = jax.random.split(jax.random.key(0), 8)
r, k, v, u = (jax.random.normal(ks[i], (B, T, H, N)) for i in range(4))
w = -jnp.exp(-0.5) * jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H, N)))
kk = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
rows_state = 0.3 * jax.random.normal(ks[5], (B, H, N, N))
bank, state_map = rows_state[:3], jnp.array([2, 0, 1, 1, 0, 2, 2, 0], jnp.int32)
bonus = jax.random.normal(ks[6], (H, N))

ops = {"wkv7": (lambda x, s, m, impl: wkv7(*x, s, m, impl=impl), (r, w, k, v, -kk, 0.5 * kk))}
if importlib.util.find_spec("rwkvkit.jax.wkv6") is not None:
    from rwkvkit.jax.wkv6 import wkv6
    ops["wkv6"] = (lambda x, s, m, impl: wkv6(*x, bonus, s, m, impl=impl), (r, 2.0 * w, k, v))

modes = {"per_row": (rows_state, None, P("data")), "shared": (rows_state[:1], None, P()),
         "bank": (bank, state_map, P())}
report = {}
for name, (op, xs) in ops.items():
    for mode, (state, smap, state_spec) in modes.items():
        if name != "wkv7" and mode != "bank":  # the modes are the shared state code: WKV-7 covers them
            continue
        def run(xs, state, smap, op=op, mode=mode, inside=False):
            # sharded: the chunked form on each device's rows; unsharded: the step-by-step reference
            if inside and mode == "shared":  # the replicated state joins the rows' varying scan carry
                state = jax.lax.pcast(state, ("data",), to="varying")
            return op(xs, state, smap, "chunked" if inside else "reference")
        in_specs = ((P("data"),) * len(xs), state_spec, None if smap is None else P("data"))
        body = functools.partial(run, inside=True)
        sharded = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(P("data"), P("data")))
        def loss_and_grads(fn):
            def loss(xs, st):
                y, s = fn(xs, st, smap)
                return (y * jnp.cos(y)).sum() + (s ** 2).sum(), (y, s)
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(xs, state)
        (_, (y, s)), g = loss_and_grads(sharded)
        (_, (y1, s1)), g1 = loss_and_grads(run)
        pairs = [(y, y1), (s, s1)] + list(zip(jax.tree.leaves(g), jax.tree.leaves(g1)))
        err = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in pairs)
        report[f"{name}/{mode}"] = {"err": err, "sharding": str(y.sharding.spec)}
print("REPORT " + json.dumps(report))
"""


def test_shard_map_matches_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])
    assert {"wkv7/per_row", "wkv7/shared", "wkv7/bank"} <= set(report)
    print(report)
    for case, got in report.items():
        assert got["sharding"] == "P('data',)", case
        assert got["err"] < 1e-4, (case, got)
