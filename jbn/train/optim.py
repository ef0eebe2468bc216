"""Optimizer and learning-rate schedule built from ``config.optim``.

SGD with (Nesterov) momentum and coupled weight decay, as ``torch.optim.SGD``:
the decay ``wd * param`` is added to the gradient before the momentum trace.
It applies to all parameters by default (as PyTorch, whose 10-epoch reference
run this reproduces), or to convolution and dense kernels only
(``weight_decay_on="kernels"``, leaving BatchNorm scale/bias and biases alone).

Example:
    >>> import ml_collections
    >>> cfg = ml_collections.ConfigDict(dict(
    ...     name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
    ...     schedule="onecycle", warmup_fraction=0.3, div_factor=25.0, final_div_factor=1e4))
    >>> tx = make_optimizer(cfg, total_steps=3900)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "WEIGHT_DECAY_TARGETS",
    "kernel_mask",
    "make_optimizer",
    "make_schedule",
    "onecycle_schedule",
]

OPTIMIZER_NAMES = ("sgd",)  # config.optim.name
SCHEDULE_NAMES = ("onecycle", "constant")  # config.optim.schedule
WEIGHT_DECAY_TARGETS = ("all", "kernels")  # config.optim.weight_decay_on


def onecycle_schedule(
    total_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> optax.Schedule:
    """PyTorch's ``OneCycleLR(anneal_strategy="cos", three_phase=False)``, step for step.

    The rate rises from ``peak / div_factor`` to ``peak`` by step
    ``pct_start * total_steps - 1``, then falls to ``peak / div_factor /
    final_div_factor`` at step ``total_steps - 1``, the last one trained, both
    along half cosines (later steps keep the final rate). optax's
    ``cosine_onecycle_schedule(total_steps)`` runs one step behind: it peaks at
    ``int(pct_start * total_steps)`` and ends at ``total_steps``, a step never
    trained (at 20 steps its last trained rate was 1.25e-3 instead of 4e-7).

    Args:
        total_steps: Number of steps trained.
        peak_value: Largest learning rate (PyTorch's ``max_lr``).
        pct_start: Fraction of the steps spent rising.
        div_factor: Initial rate = ``peak_value / div_factor``.
        final_div_factor: Final rate = initial rate / ``final_div_factor``.
    """
    initial = peak_value / div_factor
    final = initial / final_div_factor
    peak_step = float(pct_start * total_steps) - 1.0
    last_step = float(total_steps - 1)

    def half_cosine(start: float, end: float, fraction: jax.Array) -> jax.Array:
        return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * jnp.clip(fraction, 0.0, 1.0)) + 1.0)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        rising = half_cosine(initial, peak_value, step / max(peak_step, 1e-9))
        falling = half_cosine(
            peak_value, final, (step - peak_step) / max(last_step - peak_step, 1.0)
        )
        return jnp.where(step <= peak_step, rising, falling)

    return schedule


def make_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
    """Returns the learning rate as a function of the step.

    Args:
        optim_config: ``config.optim`` with ``learning_rate``, ``schedule``
            (``"onecycle"`` or ``"constant"``), ``warmup_fraction``,
            ``div_factor`` and ``final_div_factor``.
        total_steps: Length of the whole run in steps.

    Returns:
        An optax schedule.

    Raises:
        ValueError: For an unknown schedule name.
    """
    name = optim_config.schedule
    if name == "constant":
        return optax.constant_schedule(optim_config.learning_rate)
    if name == "onecycle":
        return onecycle_schedule(
            total_steps,
            peak_value=optim_config.learning_rate,
            pct_start=optim_config.warmup_fraction,
            div_factor=optim_config.div_factor,
            final_div_factor=optim_config.final_div_factor,
        )
    raise ValueError(f"Unknown schedule {name!r}; expected one of {SCHEDULE_NAMES}.")


def kernel_mask(params: Any) -> Any:
    """True for leaves named ``kernel`` (conv and dense weights), False elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_optimizer(optim_config: Any, total_steps: int) -> optax.GradientTransformation:
    """Returns SGD + momentum with coupled weight decay and the configured schedule.

    Args:
        optim_config: ``config.optim`` (``name="sgd"``, ``momentum``,
            ``nesterov``, ``weight_decay``, ``weight_decay_on`` and the schedule
            fields of `make_schedule`).
        total_steps: Length of the whole run in steps.

    Returns:
        An optax gradient transformation.

    Raises:
        ValueError: For an unknown optimizer or ``weight_decay_on`` value.
    """
    if optim_config.name not in OPTIMIZER_NAMES:
        raise ValueError(
            f"Unknown optimizer {optim_config.name!r}; expected one of {OPTIMIZER_NAMES}."
        )
    decay_on = optim_config.get("weight_decay_on", "all")
    if decay_on not in WEIGHT_DECAY_TARGETS:
        raise ValueError(
            f"weight_decay_on must be one of {WEIGHT_DECAY_TARGETS}, got {decay_on!r}."
        )
    mask = kernel_mask if decay_on == "kernels" else None
    return optax.chain(
        optax.add_decayed_weights(optim_config.weight_decay, mask=mask),
        optax.sgd(
            make_schedule(optim_config, total_steps),
            momentum=optim_config.momentum or None,
            nesterov=optim_config.nesterov,
        ),
    )
