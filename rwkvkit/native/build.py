"""Compile the native library for this machine into a per-user cache (no torch extension build).

The key of a build is a hash of the sources in ``src/``, the compiler's version, the flags and this
CPU's feature flags: a new machine, compiler or source builds again; every later process loads the
cached file. Builds go to a temporary name and are renamed into place, under a file lock, so that
processes starting together compile once and never load a half-written file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SRC = Path(__file__).parent / "src"
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-fno-math-errno"]


def flags() -> list[str]:
    """The compiler flags: ``-march=native`` (this CPU's instructions), or ``-march=$RWKVKIT_NATIVE_MARCH``
    (e.g. ``x86-64``: the plain loops every kernel falls back to, which the tests build and check)."""
    return [*FLAGS, "-march=" + (os.environ.get("RWKVKIT_NATIVE_MARCH") or "native")]


LIB_NAME = "librwkvkit_native.so"


class NativeBuildError(RuntimeError):
    """The library could not be built here (no compiler, a failed compile, an unsupported system)."""


def cache_dir() -> Path:
    """``$RWKVKIT_CACHE`` or ``$XDG_CACHE_HOME/rwkvkit`` or ``~/.cache/rwkvkit``, then ``native/``."""
    root = os.environ.get("RWKVKIT_CACHE") or os.environ.get("XDG_CACHE_HOME")
    base = (
        Path(root) / ("" if os.environ.get("RWKVKIT_CACHE") else "rwkvkit")
        if root
        else Path.home() / ".cache" / "rwkvkit"
    )
    return base / "native"


def compiler() -> str:
    """The C++ compiler: ``$CXX`` or g++ / c++ / clang++ on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    raise NativeBuildError("no C++ compiler found (set CXX, or install g++)")


def cpu_features() -> str:
    """The CPU's feature flags as the kernel reports them (empty where it does not)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def build_key(cxx: str) -> str:
    """Hash of what the build depends on."""
    h = hashlib.sha256()
    for path in sorted(SRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    for part in (version, " ".join(flags()), cpu_features(), platform.machine()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def build_library() -> Path:
    """The path of this machine's compiled library, compiling it first if the cache has none."""
    if platform.system() != "Linux":
        raise NativeBuildError(f"native build supports Linux only for now, not {platform.system()}")
    cxx = compiler()
    target = cache_dir() / build_key(cxx) / LIB_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _compile(cxx, target)
    return target


def _compile(cxx: str, target: Path) -> None:
    sources = sorted(str(p) for p in SRC.glob("*.cpp"))
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [cxx, *flags(), "-o", tmp, *sources]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        os.unlink(tmp)
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise NativeBuildError("compiling the native library failed: " + " | ".join(tail))
    os.replace(tmp, target)
