"""The norm layer of a model: its ``norm=`` factory, or jbn's BatchNorm from its settings.

Every model of `jbn.models` takes ``norm`` (a factory called with
``use_running_average=...`` and ``name=...``) and the settings of its default
norm layer (``momentum``, ``epsilon``, ``virtual_batch_size``). `norm_factory`
picks the one to use, so that each model family does not rebuild it.

Example:
    >>> from jbn.models.norm import norm_factory
    >>> make = norm_factory(None, momentum=0.9, epsilon=1e-5, virtual_batch_size=None)
    >>> layer = make(use_running_average=True)
    >>> type(layer).__name__, layer.momentum
    ('BatchNorm', 0.9)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from jbn.linen import BatchNorm

__all__ = ["ModuleFactory", "norm_factory"]

ModuleFactory = Callable[..., nn.Module]


def norm_factory(
    norm: ModuleFactory | None,
    *,
    momentum: float,
    epsilon: float,
    virtual_batch_size: int | None,
) -> ModuleFactory:
    """``norm`` if given, else `jbn.BatchNorm` with the model's settings.

    Args:
        norm: The model's ``norm`` attribute: a factory called with
            ``use_running_average=...`` and ``name=...``, or ``None``.
        momentum: Running-statistics decay of the default layer (Flax convention).
        epsilon: Added to the variance by the default layer.
        virtual_batch_size: Ghost BatchNorm group size of the default layer
            (``None``: statistics over the whole batch; not passed on then).

    Returns:
        A factory of norm layers; the settings are ignored when ``norm`` is given.
    """
    if norm is not None:
        return norm
    kwargs: dict[str, Any] = {"momentum": momentum, "epsilon": epsilon}
    if virtual_batch_size is not None:
        kwargs["virtual_batch_size"] = virtual_batch_size
    return functools.partial(BatchNorm, **kwargs)
