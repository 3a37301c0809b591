"""State files of the ``state`` / ``save_state`` request fields, kept inside ``--state-dir``.

A name is a plain file name: letters, digits, ``_``, ``-`` and ``.``, not starting with ``.``, no ``..``,
no path separators; ``.safetensors`` is added when missing, and a name that resolves outside the directory
(a symlink) is refused. Files are read and written with :func:`rwkvkit.state_io.load_state` /
:func:`~rwkvkit.state_io.save_state`, which refuse a state of another model (400).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.server.protocol import ApiError
from rwkvkit.state import RWKVState
from rwkvkit.state_io import load_state, save_state

logger = logging.getLogger("rwkvkit.serve")

STATE_SUFFIX = ".safetensors"
STATE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")


def open_state_dir(state_dir: str | os.PathLike | None) -> Path | None:
    """The state directory, created if missing (RwkvkitError if that fails); None stays None."""
    if state_dir is None:
        return None
    directory = Path(state_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RwkvkitError(f"cannot create the state directory {directory}: {e.strerror or e}") from None
    if not directory.is_dir():
        raise RwkvkitError(f"the state directory {directory} is not a directory")
    return directory


def _is_plain_name(name: str) -> bool:
    return (
        "/" not in name
        and "\\" not in name
        and ".." not in name
        and not os.path.isabs(name)
        and STATE_NAME.fullmatch(name) is not None
    )


class StateFiles:
    """The state files of one server: names checked against ``directory`` (None: state files disabled),
    loaded and saved for ``model``, counted in ``counters``."""

    def __init__(self, directory: Path | None, model, counters: dict[str, int]):
        self.directory = directory
        self.model = model
        self.counters = counters

    def path(self, name: str, param: str) -> Path:
        """The file ``name`` names inside the state directory; ApiError 400 for anything else."""
        if self.directory is None:
            raise ApiError(
                400, "state files are disabled (start the server with --state-dir DIR)", param=param
            )
        if not _is_plain_name(name):
            raise ApiError(
                400,
                f"'{param}' must be a plain file name inside the state directory (letters, digits, '_', '-', "
                "'.'; no path separators, no '..', not starting with '.')",
                param=param,
            )
        if not name.endswith(STATE_SUFFIX):
            name += STATE_SUFFIX
        root = self.directory.resolve()
        path = (root / name).resolve()
        if path.parent != root:
            raise ApiError(400, f"'{param}' resolves outside the state directory", param=param)
        return path

    async def load(self, name: str | None) -> RWKVState | None:
        """The state in the file ``name`` (the ``state`` field), or None when no name is given."""
        if name is None:
            return None
        path = self.path(name, "state")
        if not path.is_file():
            raise ApiError(404, f"state file '{path.name}' not found", param="state", code="state_not_found")
        try:
            state = await asyncio.to_thread(load_state, path, self.model)
        except RwkvkitError as e:
            message = str(e).replace(str(path), path.name)  # do not show where the directory is
            raise ApiError(400, message, param="state") from None
        self.counters["state_files_read"] += 1
        return state

    async def save(self, path: Path, state: RWKVState | None) -> None:
        """Write ``state`` (a request's final state) to ``path`` (from :meth:`path`)."""
        if state is None:
            raise ApiError(500, "no final state to save")
        try:
            await asyncio.to_thread(save_state, state, path, self.model)
        except (RwkvkitError, OSError):
            logger.exception("could not write the state file %s", path)
            raise ApiError(500, f"could not write the state file '{path.name}'") from None
        self.counters["state_files_written"] += 1
