"""Networks for the workbench, one module per family (flax.linen, NHWC).

Every model takes ``__call__(x, train)`` and a ``norm=`` factory, so any
BatchNorm-like layer (``jbn.BatchNorm``, ``flax.linen.BatchNorm``,
``jbn.BatchRenorm``) swaps in. `make_model` builds one from ``config.model``.
"""

from jbn.models.registry import make_model
from jbn.models.small_cnn import SmallBNConvNet

__all__ = ["SmallBNConvNet", "make_model"]
