"""The rewards of ``rwkvkit train --objective grpo``: ``--reward`` loaded, and completions scored.

``--reward`` is one of:

* ``module:function``: a Python function, ``module`` an importable name (``mypkg.rewards``) or the path
  of a ``.py`` file (``examples/grpo_reward.py:ends_with_period``). It is called as
  ``function(prompt=..., completion=..., **extra)`` where ``extra`` are the prompt record's other fields
  (``answer``, ...), and returns a number (a bool counts as 0 / 1).
* the path of a verifier script: it is run once per completion (``.py`` files with this Python, others
  as programs), gets ``{"prompt": ..., "completion": ..., **extra}`` as one JSON object on stdin and
  prints the reward (one number) on stdout; exit status 0, within :data:`VERIFIER_TIMEOUT` seconds.

A reward that raises, times out, exits non-zero, or gives something that is not a finite number is a
*failure*: :meth:`Reward.score` returns None and the problem, the caller skips that completion, counts it
(``reward_failures``) and logs one line naming the prompt record.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rwkvkit.errors import RwkvkitError

VERIFIER_TIMEOUT = 30.0  # seconds one verifier-script call may take


def _load_function(spec: str) -> Callable[..., Any]:
    """The function ``module:function`` names (``module`` importable or a .py path)."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name.isidentifier():
        raise RwkvkitError(f"--reward {spec}: expected module:function or a verifier script path")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise RwkvkitError(f"--reward {spec}: no such file {path}")
        loader_spec = importlib.util.spec_from_file_location(f"rwkvkit_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:  # the user's module: any error it raises
            raise RwkvkitError(
                f"--reward {spec}: {path} failed to import ({type(e).__name__}: {e})"
            ) from None
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # ModuleNotFoundError, or the module's own import-time error
            raise RwkvkitError(
                f"--reward {spec}: cannot import {module_name} ({type(e).__name__}: {e})"
            ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RwkvkitError(f"--reward {spec}: {module_name} has no function {function_name}")
    return function


def _as_reward(value: Any) -> tuple[float | None, str | None]:
    """(the reward, None) for a finite number, else (None, the problem)."""
    if isinstance(value, bool):
        return float(value), None
    if not isinstance(value, (int, float)) or isinstance(value, complex):
        try:  # numpy scalars, 0-d tensors
            import numbers

            if not isinstance(value, numbers.Real):
                raise TypeError
            value = float(value)
        except (TypeError, ValueError):
            return None, f"the reward is not a number ({type(value).__name__}: {str(value)[:60]!r})"
    value = float(value)
    if not math.isfinite(value):
        return None, f"the reward is not finite ({value})"
    return value, None


class Reward:
    """What ``--reward`` names; :meth:`score` gives one completion's reward (see the module docstring)."""

    def __init__(self, spec: str) -> None:
        if not spec:
            raise RwkvkitError("--objective grpo needs --reward (module:function or a verifier script)")
        self.spec = spec
        path = Path(spec)
        self.function: Callable[..., Any] | None = None
        self.command: list[str] | None = None
        if path.is_file():  # a verifier script (a file is never read as module:function)
            self.command = [sys.executable, str(path)] if path.suffix == ".py" else [str(path.resolve())]
        else:
            self.function = _load_function(spec)

    def score(self, prompt: str, completion: str, extra: dict[str, Any]) -> tuple[float | None, str | None]:
        """(reward, None), or (None, the problem in a few words) for a failure."""
        if self.function is not None:
            try:
                value = self.function(prompt=prompt, completion=completion, **extra)
            except Exception as e:  # the user's function: whatever it raises is a failure of this sample
                return (
                    None,
                    f"the reward function raised {type(e).__name__}: {' '.join(str(e).split())[:200]}",
                )
            return _as_reward(value)
        return self._run_verifier(prompt, completion, extra)

    def _run_verifier(
        self, prompt: str, completion: str, extra: dict[str, Any]
    ) -> tuple[float | None, str | None]:
        payload = json.dumps({**extra, "prompt": prompt, "completion": completion})
        try:
            done = subprocess.run(
                self.command, input=payload, capture_output=True, text=True, timeout=VERIFIER_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            return None, f"the verifier took more than {VERIFIER_TIMEOUT:g}s"
        except OSError as e:
            return None, f"the verifier could not run ({e.strerror or e})"
        if done.returncode != 0:
            tail = " ".join(done.stderr.split())[-200:]
            return None, f"the verifier exited with status {done.returncode}" + (f" ({tail})" if tail else "")
        text = done.stdout.strip()
        try:
            return _as_reward(float(text))
        except ValueError:
            return None, f"the verifier printed {text[:60]!r}, not a number"
