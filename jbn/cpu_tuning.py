"""Process settings that make XLA:CPU train steps fast, applied by re-executing.

Settings read only at process start, so entry points (``train.py``,
``python -m jbn.sweep``) re-execute themselves once with them set:

- glibc allocator: an XLA:CPU step allocates large fresh buffers every call.
  With the default (dynamic) mmap threshold each is mapped and zero-filled
  page by page; serving them from the heap made the step ~30% faster here.
- ``--xla_cpu_experimental_ynn_fusion_type=dot,reduce``: keeps XLA's YNNPACK
  fusions for dots and reductions but not for convolutions, whose weight
  gradients YNNPACK runs several times slower than XLA's default kernels.
  Measured: SmallBNConvNet train step 33 -> 17.5 ms (BENCHMARKS.md).
- ``--xla_cpu_use_fusion_emitters=false``: XLA's older elemental emitter for
  loop fusions, which ran the train step's element-wise fusions (BatchNorm,
  pooling, their gradients, the transposes around convolutions) faster: the
  step took 0.88x the time in a same-process comparison (2026-11-27, AMD EPYC,
  2 cores), and BatchNorm forward+backward 0.85-0.93x.

The XLA flags are only added for jaxlib releases where they were measured
(`TUNED_JAXLIB`): unknown XLA flags abort the process.

Set ``JBN_NO_CPU_TUNING=1`` to run without either.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping, Sequence

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
XLA_CPU_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=dot,reduce",
    "--xla_cpu_use_fusion_emitters=false",
)
TUNED_JAXLIB = ("0.10.",)  # jaxlib release prefixes where XLA_CPU_FLAGS exist and were measured.
OPT_OUT_ENV = "JBN_NO_CPU_TUNING"


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Returns ``base`` (default: ``os.environ``) with the settings added.

    Values already in ``base`` win: each XLA flag is appended to ``XLA_FLAGS``
    unless that already sets the same flag.
    """
    env = dict(os.environ if base is None else base)
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    if not _jaxlib_version().startswith(TUNED_JAXLIB):
        return env
    flags = env.get("XLA_FLAGS", "")
    for flag in XLA_CPU_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    if flags:
        env["XLA_FLAGS"] = flags
    return env


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
