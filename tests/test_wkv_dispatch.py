"""Tests for the WKV dispatch (rwkvkit.wkv.dispatch): the implementation switch is per context.

A ``use_impl`` switch in one thread must not change what another thread's operators run (the engine
runs its model in its own thread while a test or a caller switches implementations in another).
"""

from __future__ import annotations

import threading

import pytest
import torch

import rwkvkit.wkv as wkv
from rwkvkit.wkv import use_impl, wkv6


def _inputs(T: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(1, T, 2, 8, generator=gen) for _ in range(3))
    w = -torch.rand(1, T, 2, 8, generator=gen)
    u = torch.randn(2, 8, generator=gen)
    return [r, w, k, v], u


def test_switch_in_one_thread_is_not_seen_by_another() -> None:
    (r, w, k, v), u = _inputs(20)
    y_chunked, _ = wkv6(r, w, k, v, u, impl="chunked")
    y_reference, _ = wkv6(r, w, k, v, u, impl="reference")
    assert not torch.equal(y_chunked, y_reference)  # the two forms are told apart by their rounding

    switched, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def switcher() -> None:
        with use_impl("reference"):
            seen["switcher"] = wkv.get_default_impl()
            seen["switcher_y"] = wkv6(r, w, k, v, u)[0]
            switched.set()
            release.wait(timeout=30)

    thread = threading.Thread(target=switcher)
    thread.start()
    try:
        assert switched.wait(timeout=30)
        # the other thread is inside its `with use_impl("reference")` block now
        assert wkv.get_default_impl() is None
        y_auto, _ = wkv6(r, w, k, v, u)  # auto: chunked for T = 20
        assert torch.equal(y_auto, y_chunked)
    finally:
        release.set()
        thread.join(timeout=30)
    assert seen["switcher"] == "reference"
    assert torch.equal(seen["switcher_y"], y_reference)


def test_switch_in_this_thread_is_not_seen_by_a_worker_thread() -> None:
    (r, w, k, v), u = _inputs(20)
    y_chunked, _ = wkv6(r, w, k, v, u, impl="chunked")
    seen: dict[str, object] = {}

    def worker() -> None:
        seen["impl"] = wkv.get_default_impl()
        seen["y"] = wkv6(r, w, k, v, u)[0]

    with use_impl("reference"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(timeout=30)
        assert wkv.get_default_impl() == "reference"
    assert seen["impl"] is None
    assert torch.equal(seen["y"], y_chunked)


def test_use_impl_nests_and_restores() -> None:
    assert wkv.get_default_impl() is None
    with use_impl("chunked"):
        with use_impl("reference"):
            assert wkv.get_default_impl() == "reference"
        assert wkv.get_default_impl() == "chunked"
        with use_impl(None):  # back to auto inside the block
            assert wkv.get_default_impl() is None
    assert wkv.get_default_impl() is None
    with pytest.raises(ValueError, match="unknown impl"):
        with use_impl("cuda"):
            pass


def test_set_default_impl_is_deprecated_and_per_context() -> None:
    seen: dict[str, object] = {}

    def worker() -> None:
        with pytest.warns(DeprecationWarning):
            seen["previous"] = wkv.set_default_impl("reference")
        seen["impl"] = wkv.get_default_impl()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30)
    assert seen == {"previous": None, "impl": "reference"}
    assert wkv.get_default_impl() is None  # the worker's setting stayed in the worker
