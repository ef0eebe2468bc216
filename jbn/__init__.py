"""jbn: Batch Normalization for JAX.

The public API, re-exported from the layers below it (docs/architecture.md):
the functional core (`jbn.core`) and the ``flax.linen`` modules (`jbn.linen`);
``jbn.nnx``, ``jbn.models``, ``jbn.interop_torch`` and the other subpackages
import on first use. Names load lazily (PEP 562), so ``import jbn.cpu_tuning``
and other light modules do not pull in JAX and Flax; the ``TYPE_CHECKING``
imports show type checkers and IDEs the same names where they live.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Keep in step with _EXPORTS (tests/test_public_api.py checks).
    from jbn.core.normalization import (
        Moments,
        batch_norm,
        init_batch_stats,
        init_params,
        moments,
        normalize,
        update_running_stats,
    )
    from jbn.core.renorm import batch_renorm, renorm_clip_schedule
    from jbn.linen import BatchNorm, BatchRenorm

__version__ = "0.1.0"

_EXPORTS = {
    "BatchNorm": "jbn.linen",
    "BatchRenorm": "jbn.linen",
    "Moments": "jbn.core.normalization",
    "batch_norm": "jbn.core.normalization",
    "batch_renorm": "jbn.core.renorm",
    "init_batch_stats": "jbn.core.normalization",
    "init_params": "jbn.core.normalization",
    "moments": "jbn.core.normalization",
    "normalize": "jbn.core.normalization",
    "renorm_clip_schedule": "jbn.core.renorm",
    "update_running_stats": "jbn.core.normalization",
}

__all__ = [  # Literal, for static tools; the same names as _EXPORTS.
    "BatchNorm",
    "BatchRenorm",
    "Moments",
    "batch_norm",
    "batch_renorm",
    "init_batch_stats",
    "init_params",
    "moments",
    "normalize",
    "renorm_clip_schedule",
    "update_running_stats",
]


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
