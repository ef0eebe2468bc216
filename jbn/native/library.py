"""Builds, caches and registers jbn's C++ XLA:CPU kernels (``jax.ffi``).

A kernel's source (a ``.cc`` file) is compiled on first use with the
machine's C++ compiler (``$CXX``, default ``g++``; seconds, once) against the
XLA FFI headers that jaxlib ships, with ``jbn/native/csrc`` on the include
path, and cached under the user cache directory (``$JBN_CACHE_DIR`` or
``pooch.os_cache("jbn")``), keyed by the source and the shared headers, the
jaxlib version, the compiler, its flags and the CPU, with its SHA-256 beside
it: a cached library that does not match its checksum (truncated, damaged) is
rebuilt before it is loaded. Without a compiler, or if the build fails (a
warning says why), `load` returns False and callers use XLA's path. Set
``JBN_NO_NATIVE=1`` to never build or use a kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence

import jax
import pooch

__all__ = ["CACHE_DIR_ENV", "INCLUDE_DIR", "OPT_OUT_ENV", "library_path", "load"]

OPT_OUT_ENV = "JBN_NO_NATIVE"
CACHE_DIR_ENV = "JBN_CACHE_DIR"
INCLUDE_DIR = pathlib.Path(__file__).with_name("csrc")
_FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC")


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags (``-march=native`` builds are CPU-specific)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def compiler() -> str:
    """The C++ compiler: ``$CXX``, default ``g++``."""
    return os.environ.get("CXX", "g++")


def library_path(source: pathlib.Path, compiler_name: str) -> pathlib.Path:
    """Where the library built from ``source`` with ``compiler_name`` is cached."""
    key = hashlib.sha256()
    for part in (
        source.read_bytes(),
        *(header.read_bytes() for header in sorted(INCLUDE_DIR.glob("*.h"))),
        importlib.metadata.version("jaxlib").encode(),
        compiler_name.encode(),
        " ".join(_FLAGS).encode(),
        platform.machine().encode(),
        _cpu_signature().encode(),
    ):
        key.update(part)
    base = pathlib.Path(os.environ.get(CACHE_DIR_ENV) or pooch.os_cache("jbn"))
    return base / "native" / f"{source.stem}-{key.hexdigest()[:16]}.so"


def checksum_path(library: pathlib.Path) -> pathlib.Path:
    """The file beside ``library`` that holds its SHA-256."""
    return library.with_name(library.name + ".sha256")


def sha256(path: pathlib.Path) -> str:
    """The SHA-256 of a file, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_intact(library: pathlib.Path) -> bool:
    """Whether ``library`` exists and matches the checksum written when it was built."""
    try:
        return checksum_path(library).read_text().strip() == sha256(library)
    except OSError:
        return False


def _build(source: pathlib.Path, compiler_name: str, target: pathlib.Path) -> None:
    """Compiles ``source`` into ``target``, then writes its checksum beside it.

    Both files are replaced atomically, so concurrent processes are safe: one
    that finds the new library with the old checksum rebuilds it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = pathlib.Path(scratch) / target.name
        command = [
            compiler_name,
            *_FLAGS,
            "-isystem",
            jax.ffi.include_dir(),
            "-I",
            str(INCLUDE_DIR),
            str(source),
        ]
        subprocess.run([*command, "-o", str(built)], check=True, capture_output=True, text=True)
        checksum = checksum_path(built)
        checksum.write_text(sha256(built) + "\n")
        os.replace(built, target)
        os.replace(checksum, checksum_path(target))


@functools.cache
def load(source: pathlib.Path, targets: Sequence[str]) -> bool:
    """Builds (once per machine) ``source`` and registers its handlers for the CPU.

    Args:
      source: The kernel's C++ file.
      targets: The handler symbols it defines; each is registered under its own name.

    Returns:
      True once registered; False (with a warning if a build failed) where it cannot be.
    """
    if os.environ.get(OPT_OUT_ENV):
        return False
    compiler_name = compiler()
    if shutil.which(compiler_name) is None:
        return False
    library = library_path(source, compiler_name)
    try:
        if not is_intact(library):
            if library.exists():
                warnings.warn(
                    f"jbn.native: the cached {library} does not match its checksum "
                    "(damaged or from an older jbn); rebuilding it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _build(source, compiler_name, library)
        # Loading a damaged shared library can crash the process (SIGBUS), so
        # only a library that matches its checksum is loaded.
        if not is_intact(library):
            raise OSError("the library does not match its checksum after the build")
        handlers = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"jbn.native: could not build or load {library} ({detail.strip()[-500:]}); "
            "using XLA's path instead.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    for name in targets:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handlers, name)), "cpu")
    return True
