"""glibc allocator settings for fast XLA:CPU steps, applied by re-executing the process.

An XLA:CPU step allocates large fresh buffers every call. With glibc's default
(dynamic) mmap threshold each of them is mapped and zero-filled by the kernel
page by page; serving them from the heap instead made the train step about
30% faster on the 2-core CPU machines here. The variables are only read at
process start, so entry points re-execute themselves once with them set.
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
OPT_OUT_ENV = "JBN_NO_MALLOC_TUNING"


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Returns ``base`` (default: ``os.environ``) with the allocator settings added.

    Values already set in ``base`` win.
    """
    env = dict(os.environ if base is None else base)
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    return env


def reexec_with_malloc_tuning() -> None:
    """Re-executes this Python program once with `MALLOC_ENV` set.

    Call it first thing in an entry point, before importing JAX. A no-op when
    the variables are already set or ``JBN_NO_MALLOC_TUNING`` is set.
    """
    if os.environ.get(OPT_OUT_ENV) is not None:
        return
    if all(key in os.environ for key in MALLOC_ENV):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], environment())
