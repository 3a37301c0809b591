"""The native CPU decode path: a small C++ library compiled for this machine, loaded with ctypes.

What it owns: building the library from the sources in ``src/`` (:mod:`rwkvkit.native.build`: on first
use, into a per-user cache keyed by the sources, the compiler, the flags and the CPU), loading it, and
the reason it is off when it is (``RWKVKIT_NATIVE=0``, no compiler, a failed build, not a CPU).
:mod:`rwkvkit.native.matrix` describes weights to it, :mod:`rwkvkit.native.step` runs a model's
one-token step through it. Everything works without it, on the pure-torch path it is tested against.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

_LOCK = threading.Lock()
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("rwkvkit_native", default=True)
_STATE: dict[str, object] = {}  # "lib": the loaded CDLL or None, "reason": why it is off


def disabled_by_env() -> bool:
    """Whether ``RWKVKIT_NATIVE=0`` (or ``off`` / ``false`` / ``no``) turns the native path off."""
    return os.environ.get("RWKVKIT_NATIVE", "1").strip().lower() in ("0", "off", "false", "no")


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Inside ``with enabled(False)``, models in this thread (context) decode on the pure-torch path
    (to test or measure that path; ``RWKVKIT_NATIVE=0`` turns the library off for the whole process)."""
    token = _ENABLED.set(on)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def is_enabled() -> bool:
    """Whether this context lets models use the native step (see :func:`enabled`)."""
    return _ENABLED.get()


def load() -> ctypes.CDLL | None:
    """The native library (built on first use), or None where it is off; says why once on stderr."""
    with _LOCK:
        if "lib" not in _STATE:
            lib, reason = _load()
            _STATE["lib"], _STATE["reason"] = lib, reason
            if lib is None and reason and not disabled_by_env():
                print(
                    f"rwkvkit: native CPU decode off ({reason}); using the pure-torch path", file=sys.stderr
                )
        return _STATE["lib"]  # type: ignore[return-value]


def status() -> str:
    """One line: which decode path a CPU model uses and why."""
    lib = load()
    if lib is None:
        return f"pure torch ({_STATE['reason']})"
    return f"native ({lib.rk_build_info().decode()})"


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if disabled_by_env():
        return None, "RWKVKIT_NATIVE=0"
    import torch  # noqa: F401  (loaded first: the library then shares torch's OpenMP runtime)

    from rwkvkit.native.build import NativeBuildError, build_library  # lazy: only where it is used

    try:
        path = build_library()
        lib = ctypes.CDLL(str(path))
    except (NativeBuildError, OSError) as exc:
        return None, str(exc)
    lib.rk_build_info.restype = ctypes.c_char_p
    lib.rk_matmul.restype = lib.rk_matmul_reference.restype = ctypes.c_int32
    return lib, None


@contextlib.contextmanager
def exact_activations() -> Iterator[None]:
    """Inside, int8 / int4 products take fp32 activations (no int8 quantization of x): a quantized
    model's native step is then exactly the torch model on the dequantized weights (what tests check)."""
    lib = load()
    if lib is None:
        yield
        return
    lib.rk_set_exact_activations(1)
    try:
        yield
    finally:
        lib.rk_set_exact_activations(0)


def _reset_for_tests() -> None:
    """Forget the loaded library so the next :func:`load` reads the environment again."""
    with _LOCK:
        _STATE.clear()
