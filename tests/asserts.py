"""Closeness checks the operator tests share (a result against an independent reference)."""

from __future__ import annotations

import torch


def assert_matches(x: torch.Tensor, ref: torch.Tensor, name: str, rel: float = 1e-4) -> None:
    """Norm-based relative error below `rel`, plus elementwise closeness scaled to the reference."""
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    if ref.norm() == 0:  # e.g. grad w at T = 1 with a zero state: decay only ever acts on zeros
        assert x.abs().max().item() < 1e-6, f"{name}: expected zeros, max |x| = {x.abs().max().item():.3g}"
        return
    err = ((x - ref).norm() / ref.norm()).item()
    assert err < rel, f"{name}: relative error {err:.3g} >= {rel:g}"
    scale = ref.abs().max().item()
    torch.testing.assert_close(x, ref, rtol=10 * rel, atol=rel * scale, msg=lambda m: f"{name}: {m}")
