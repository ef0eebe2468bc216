"""Evaluating a train state: the jitted eval step and the whole-test-set evaluation.

Evaluation uses the running BatchNorm statistics and mutates nothing. The test
set is split over the mesh's ``"data"`` axis like a training batch, its last
batch padded and masked, so every image counts exactly once on any number of
devices and processes. `jbn.train.loop` evaluates after every epoch and, with
``config.eval_every_steps``, every N steps (`jbn.train.step_eval`).

Example:
    >>> step_fn = make_eval_step(mesh, dataset.info)  # doctest: +SKIP
    >>> evaluate(state, dataset, config, mesh, step_fn)  # doctest: +SKIP
    {'test_loss': 1.02, 'test_accuracy': 0.64, 'test_count': 10000}
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jbn.train import data, datasets, distributed
from jbn.train.state import TrainState

__all__ = ["eval_step", "evaluate", "make_eval_step", "model_variables"]

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def model_variables(state: TrainState) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` of ``state`` for ``apply`` (no stats without BN)."""
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def eval_step(
    state: TrainState, batch: Batch, *, info: datasets.DatasetInfo = data.CIFAR10.info
) -> Metrics:
    """Masked evaluation sums with the running statistics; nothing is mutated.

    Args:
        state: The state to evaluate.
        batch: ``dict(image, label, mask)``; rows with ``mask=False`` are padding.
        info: The data set, whose channel statistics normalise the images.

    Returns:
        ``dict(loss_sum, correct, count)`` over the valid rows (float32).
    """
    logits = state.apply_fn(
        model_variables(state), data.preprocess(batch["image"], info), train=False
    )
    mask = batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(loss * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }


def make_eval_step(mesh: Mesh, info: datasets.DatasetInfo = data.CIFAR10.info) -> Any:
    """``eval_step`` jitted over ``mesh`` for data set ``info``: ``step(state, batch) -> sums``."""
    replicated = distributed.replicated(mesh)
    return jax.jit(
        functools.partial(eval_step, info=info),
        in_shardings=(replicated, distributed.batch_sharding(mesh)),
        out_shardings=replicated,
    )


def evaluate(
    state: TrainState, dataset: data.Dataset, config: Any, mesh: Mesh, step_fn: Any
) -> dict:
    """Evaluates on the whole test set, every image exactly once.

    Args:
        state: The (replicated) state to evaluate.
        dataset: Its ``test_images`` and ``test_labels`` are evaluated.
        config: The run config (``data.eval_batch_size``, ``data.prefetch``).
        mesh: The device mesh.
        step_fn: The jitted eval step (`make_eval_step`).

    Returns:
        ``dict(test_loss, test_accuracy, test_count)`` as Python numbers.
    """
    batches = data.eval_batches(
        dataset.test_images,
        dataset.test_labels,
        config.data.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    totals = None
    for batch in data.device_batches(batches, mesh, config.data.prefetch):
        sums = step_fn(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = int(totals["count"])
    return {
        "test_loss": float(totals["loss_sum"]) / max(count, 1),
        "test_accuracy": float(totals["correct"]) / max(count, 1),
        "test_count": count,
    }
