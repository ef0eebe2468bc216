"""jbn: Batch Normalization for JAX.

The public names are loaded lazily (PEP 562), so ``import jbn.cpu_tuning``
and other light submodules do not pull in JAX and Flax.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BatchNorm": "jbn.linen",
    "Moments": "jbn.functional",
    "batch_norm": "jbn.functional",
    "init_batch_stats": "jbn.functional",
    "init_params": "jbn.functional",
    "moments": "jbn.functional",
    "normalize": "jbn.functional",
    "update_running_stats": "jbn.functional",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        try:
            value = importlib.import_module(f"jbn.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"jbn.{name}":
                raise
            raise AttributeError(f"module 'jbn' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
