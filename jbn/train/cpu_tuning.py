"""Settings that make XLA:CPU train steps fast: per process, and per compiled function.

Entry points (``train.py``, ``python -m jbn.sweep``) re-execute themselves
once with the process settings set (`reexec_tuned`):

- glibc allocator: an XLA:CPU step allocates large fresh buffers every call.
  With the default (dynamic) mmap threshold each is mapped and zero-filled
  page by page; serving them from the heap made the step ~30% faster here.
- ``--xla_cpu_experimental_ynn_fusion_type=dot,reduce``: keeps XLA's YNNPACK
  fusions for dots and reductions but not for convolutions, whose weight
  gradients YNNPACK runs several times slower than XLA's default kernels.
  Measured when it was added (2026-11-24, the 2-core CPU machine of that day):
  SmallBNConvNet train step 33 -> 17.5 ms. BENCHMARKS.md's untuned rows and
  ``bench.bench_cpu_settings`` measure all the settings together against none.

The XLA flag is only added for jaxlib releases where it was measured
(`TUNED_JAXLIB`): unknown XLA flags abort the process.

A script of one's own needs neither the variables nor the re-execution: jbn
carries both settings itself. `tune_allocator` sets the same glibc thresholds
from inside the running process (``mallopt``), and `train_step_compiler_options`
includes the YNNPACK setting as a compile option of the train step
(``xla_cpu_experimental_ynn_fusion_type``; the compiled step is the same,
instruction for instruction, as under the XLA flag)::

    cpu_tuning.tune_allocator()
    step = jax.jit(step, compiler_options=cpu_tuning.train_step_compiler_options("cpu"))

Two more settings are per compiled function, not per process:

- `train_step_compiler_options` (``xla_cpu_use_fusion_emitters=False``, XLA's
  older elemental emitter for loop fusions) made the whole SmallBNConvNet train
  step faster (0.88x the time in a same-process comparison, 2026-11-27, AMD
  EPYC, 2 cores) but BatchNorm alone slower (1.0-1.12x), so ``jbn.train.loop``
  compiles only the train step with it.
- `init_compiler_options` (``xla_backend_optimization_level=0``) for the
  one-off parameter initialisation: LLVM's optimisation of the threefry random
  bits took most of its compile time (SmallBNConvNet: 4.1 s -> 0.6 s). The
  initial values can differ from an optimised build in the last bit.

Set ``JBN_NO_CPU_TUNING=1`` to run without any of them.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
# mallopt's parameter numbers (glibc's malloc.h) for the same two thresholds.
_MALLOPT_PARAMS = {"MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1}
XLA_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
# The same setting as a compile option (DebugOptions enum names).
YNN_FUSION_OPTION = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}
TUNED_JAXLIB = ("0.10.",)  # jaxlib releases where these settings exist and were measured.
TRAIN_STEP_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False, **YNN_FUSION_OPTION}
INIT_CPU_OPTIONS = {"xla_backend_optimization_level": 0}
OPT_OUT_ENV = "JBN_NO_CPU_TUNING"


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Returns ``base`` (default: ``os.environ``) with the settings added.

    Values already in ``base`` win; the XLA flag is appended to ``XLA_FLAGS``
    unless that already sets ``xla_cpu_experimental_ynn_fusion_type``.
    """
    env = dict(os.environ if base is None else base)
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    flags = env.get("XLA_FLAGS", "")
    if _jaxlib_version().startswith(TUNED_JAXLIB) and "ynn_fusion_type" not in flags:
        env["XLA_FLAGS"] = f"{flags} {XLA_CPU_FLAG}".strip()
    return env


def _cpu_options(platform: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` on a tuned CPU, else empty (other platforms, untested jaxlib, opt-out)."""
    tuned = _jaxlib_version().startswith(TUNED_JAXLIB) and os.environ.get(OPT_OUT_ENV) is None
    return dict(options) if platform == "cpu" and tuned else {}


def train_step_compiler_options(platform: str) -> dict[str, Any]:
    """XLA compile options for the train step on ``platform`` (``"cpu"``, ``"gpu"``, ...).

    On the CPU: XLA's older fusion emitter and the YNNPACK setting of
    `XLA_CPU_FLAG` (unless ``XLA_FLAGS`` chooses its own YNNPACK fusions, which
    then stand). Empty off the CPU, on untested jaxlib releases, or when
    ``JBN_NO_CPU_TUNING`` is set.
    """
    options = _cpu_options(platform, TRAIN_STEP_CPU_OPTIONS)
    if "ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        for key in YNN_FUSION_OPTION:
            options.pop(key, None)
    return options


def init_compiler_options(platform: str) -> dict[str, Any]:
    """XLA compile options for the one-off parameter initialisation on ``platform``.

    Empty where `train_step_compiler_options` is.
    """
    return _cpu_options(platform, INIT_CPU_OPTIONS)


def tune_allocator() -> bool:
    """Sets glibc's mmap and trim thresholds of `MALLOC_ENV` in the running process.

    The same settings as the environment variables (which glibc reads only when
    a process starts), through ``mallopt``: they act on the allocations made
    after the call, so call it before the first jitted step. ``mallopt`` takes
    a C ``int``, so the trim threshold becomes ``2**31 - 1`` (any value above
    the step's buffers does the same). Variables already set in the
    environment are left alone.

    Returns:
      True if the thresholds were set; False off glibc, on an untested jaxlib
      release, or when ``JBN_NO_CPU_TUNING`` is set.
    """
    if not _jaxlib_version().startswith(TUNED_JAXLIB) or os.environ.get(OPT_OUT_ENV) is not None:
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = True
    for key, param in _MALLOPT_PARAMS.items():
        if key not in os.environ:
            done &= mallopt(param, min(int(MALLOC_ENV[key]), 2**31 - 1)) == 1
    return done


def reexec_tuned(argv: Sequence[str] | None = None) -> None:
    """Re-executes this process once with `environment`, unless already tuned.

    Call it first thing in an entry point, before importing JAX. A no-op when
    nothing would change or ``JBN_NO_CPU_TUNING`` is set.

    Args:
      argv: Command line of the new process (default: ``python`` + ``sys.argv``).
    """
    if os.environ.get(OPT_OUT_ENV) is not None:
        return
    env = environment()
    if all(os.environ.get(key) == value for key, value in env.items()):
        return
    os.execve(sys.executable, list(argv or [sys.executable, *sys.argv]), env)
