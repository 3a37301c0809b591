"""rwkvkit.keras and rwkvkit.jax.compat against independent references, one subprocess per Keras backend.

The child (tests/keras_child.py) runs under KERAS_BACKEND=jax or torch (tensorflow is not installed: the
keras.ops form is checked on jax and torch with impl="keras"). Here, without keras: the layer's outputs and
gradients are compared with rwkvkit's torch step-by-step reference in float64 (torch autograd), and the
seed adapters with a float64 NumPy loop written from the seed's definition ([key, value] state,
decay exp(-exp(w))).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("keras") is None:  # not imported here: keras needs KERAS_BACKEND first
    pytest.skip("keras is not installed", allow_module_level=True)
torch = pytest.importorskip("torch")

from rwkvkit.wkv import wkv6  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
B, T, H, N = 2, 21, 2, 8  # T not a multiple of the chunk (8): the padded tail is covered
RTOL = 1e-5


def make_inputs() -> dict:
    rng = np.random.default_rng(7)
    f = np.float32
    x = {n: rng.standard_normal((B, T, H * N)).astype(f) for n in ("r", "k", "v")}
    x["w"] = (rng.standard_normal((B, T, H * N)) * 1.5).astype(f)  # raw: decays exp(-exp(w)) ~ 1e-8 .. 0.99
    x["u"] = rng.standard_normal((H, N)).astype(f)
    x["s"] = rng.standard_normal((B, H, N, N)).astype(f)
    x["gy"] = rng.standard_normal((B, T, H * N)).astype(f)
    x["gs"] = rng.standard_normal((B, H, N, N)).astype(f)
    x["bank"] = rng.standard_normal((3, H, N, N)).astype(f)
    x["state_map"] = np.array([2, 0], np.int32)
    return x


def run_child(backend: str, x: dict, tmp_path: Path) -> dict:
    src, dst = tmp_path / f"in_{backend}.npz", tmp_path / f"out_{backend}.npz"
    np.savez(src, **x)
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "keras_child.py"), str(src), str(dst)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(dst))


def layer_reference(x: dict) -> dict:
    """y, final and gradients of the WKV6 layer (decay="raw") from rwkvkit's torch reference, float64."""
    t = {
        n: torch.tensor(x[n], dtype=torch.float64, requires_grad=True) for n in ("r", "k", "v", "w", "u", "s")
    }
    r4, k4, v4, w4 = (t[n].reshape(B, T, H, N) for n in ("r", "k", "v", "w"))
    y, final = wkv6(r4, -torch.exp(w4), k4, v4, t["u"], t["s"], impl="reference")
    y = y.reshape(B, T, H * N)
    ((y * torch.tensor(x["gy"]).double()).sum() + (final * torch.tensor(x["gs"]).double()).sum()).backward()
    out = {"y": y, "final": final, **{f"d{n}": t[n].grad for n in ("r", "k", "v", "w", "u", "s")}}
    return {n: a.detach().numpy() for n, a in out.items()}


def seed_reference(x: dict, init: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The seed's recurrence, float64, state [key, value]: y_t = r_t (u * k_t v_t^T + S), S = k_t v_t^T +
    exp(-exp(w_t)) * S, per head; ``init`` (B, H, N, N) or None."""
    r, k, v, w = (x[n].astype(np.float64).reshape(B, T, H, N) for n in ("r", "k", "v", "w"))
    u = x["u"].astype(np.float64)[None, :, :, None]  # (1, H, N_k, 1)
    s = np.zeros((B, H, N, N)) if init is None else init.astype(np.float64).copy()
    y = np.zeros((B, T, H, N))
    for i in range(T):
        kv = k[:, i, :, :, None] * v[:, i, :, None, :]  # (B, H, N_k, N_v)
        y[:, i] = np.einsum("bhk,bhkv->bhv", r[:, i], u * kv + s)
        s = kv + np.exp(-np.exp(w[:, i]))[..., None] * s
    return y.reshape(B, T, H * N), s


def close(got: np.ndarray, want: np.ndarray, name: str) -> None:
    err = np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30)
    assert got.shape == want.shape and err < RTOL, (
        f"{name}: shape {got.shape} vs {want.shape}, rel err {err:.2e}"
    )


@pytest.fixture(scope="module")
def inputs() -> dict:
    return make_inputs()


@pytest.fixture(scope="module")
def layer_ref(inputs: dict) -> dict:
    return layer_reference(inputs)


# tensorflow runs where it is installed: `make test-tensorflow` installs tensorflow-cpu and runs this file
BACKENDS = ["jax", "torch"] + (["tensorflow"] if importlib.util.find_spec("tensorflow") else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_backend(backend: str, inputs: dict, layer_ref: dict, tmp_path: Path) -> None:
    got = run_child(backend, inputs, tmp_path)
    # The layer, the backend's native form and the keras.ops form: outputs and gradients.
    for impl in ("None", "keras"):
        for name, want in layer_ref.items():
            close(got[f"layer_{impl}_{name}"], want, f"{backend} layer impl={impl} {name}")
    # The seed adapters on every state mode.
    x, bank = inputs, inputs["bank"]
    plain = seed_reference(x, None)
    close(got["adapter_plain_y"], plain[0], "plain y")
    assert got["adapter_plain_state_is_none"]
    close(got["adapter_with_state_y"], plain[0], "with_state y (u as (C,))")
    close(got["adapter_with_state_s"], plain[1], "with_state state")
    shared = seed_reference(x, np.broadcast_to(bank[:1], (B, H, N, N)))
    for mode in ("shared_map", "shared3d"):
        close(got[f"adapter_{mode}_y"], shared[0], f"{mode} y")
        close(got[f"adapter_{mode}_s"], shared[1], f"{mode} state")
    per_row = seed_reference(x, bank[:B])
    close(got["adapter_per_row_y"], per_row[0], "per-row y")
    close(got["adapter_per_row_s"], per_row[1], "per-row state")
    banked = seed_reference(x, bank[x["state_map"]])
    close(got["adapter_bank_y"], banked[0], "bank y")
    close(got["adapter_bank_s"], banked[1], "bank state")
    close(got["adapter_keras_bank_y"], banked[0], "keras-form bank y")
    if backend == "jax":
        close(got["adapter_jax_shared_map_y"], shared[0], "jax.compat jit shared state_map y")
        close(got["adapter_jax_shared_map_s"], shared[1], "jax.compat jit shared state_map state")
        close(got["adapter_jax_plain_y"], plain[0], "jax.compat plain y")
        close(got["adapter_jax_bank_y"], banked[0], "jax.compat bank y")
        close(got["adapter_jax_bank_s"], banked[1], "jax.compat bank state")
        assert got["adapter_jax_plain_state_is_none"]
    bad_map, bad_c, lone_map = (str(m) for m in got["refusals"])
    assert "state_map[1] = 3 is outside the state bank [0, 3)" in bad_map, bad_map
    assert "not a multiple of head_size" in bad_c and "without init_state" in lone_map, (bad_c, lone_map)
    # A few train steps lower the loss and train the layer's state bank.
    losses = got["fit_losses"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    assert got["fit_bank_abs"] > 0
