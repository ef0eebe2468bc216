"""jbn: Batch Normalization for JAX."""

from jbn.functional import (
    Moments,
    batch_norm,
    init_batch_stats,
    init_params,
    moments,
    normalize,
    update_running_stats,
)
from jbn.linen import BatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "Moments",
    "batch_norm",
    "init_batch_stats",
    "init_params",
    "moments",
    "normalize",
    "update_running_stats",
]
