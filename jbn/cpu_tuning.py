"""Process settings that make XLA:CPU train steps fast, applied by re-executing.

Two settings, both read only at process start, so entry points (``train.py``,
``python -m jbn.sweep``) re-execute themselves once with them set:

- glibc allocator: an XLA:CPU step allocates large fresh buffers every call.
  With the default (dynamic) mmap threshold each is mapped and zero-filled
  page by page; serving them from the heap made the step ~30% faster here.
- ``--xla_cpu_experimental_ynn_fusion_type=dot,reduce``: keeps XLA's YNNPACK
  fusions for dots and reductions but not for convolutions, whose weight
  gradients YNNPACK runs several times slower than XLA's default kernels.
  Measured: SmallBNConvNet train step 33 -> 17.5 ms (BENCHMARKS.md). The flag
  is experimental, so it is only added for jaxlib releases where it was
  measured (`TUNED_JAXLIB`); unknown XLA flags abort the process.

Set ``JBN_NO_CPU_TUNING=1`` to run without either.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping, Sequence

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
XLA_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
TUNED_JAXLIB = ("0.10.",)  # jaxlib release prefixes where XLA_CPU_FLAG exists and was measured.
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
