"""The train state and its initialisation, replicated over a device mesh.

`TrainState` is flax's, plus the BatchNorm running statistics; `create_train_state`
builds the model from ``config.model`` and the optimizer from ``config.optim``
and initialises both, compiled once with every leaf replicated over the mesh.

Example:
    >>> mesh = distributed.create_mesh({"data": -1})  # doctest: +SKIP
    >>> state = create_train_state(config, jax.random.key(0), mesh)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax.training import train_state
from jax.sharding import Mesh

from jbn.models import make_model
from jbn.train import cpu_tuning, data, datasets, distributed
from jbn.train.optim import make_optimizer

__all__ = ["TrainState", "create_train_state"]


class TrainState(train_state.TrainState):
    """Flax TrainState plus the BatchNorm running statistics (``{}`` without BN)."""

    batch_stats: Any = flax.struct.field(default_factory=dict)


def create_train_state(
    config: Any, rng: jax.Array, mesh: Mesh, *, steps_per_epoch: int | None = None
) -> TrainState:
    """Initialises model variables and optimizer state, replicated over ``mesh``.

    On the CPU the initialisation is compiled with `cpu_tuning.init_compiler_options`.

    Args:
        config: The run config (``model``, ``optim``, ``data.name``,
            ``data.batch_size``, ``num_epochs``).
        rng: PRNG key for the parameter initialisation.
        mesh: Device mesh; every leaf is replicated over it.
        steps_per_epoch: Steps of one epoch, for the LR schedule (default: the
            official training set of ``config.data.name`` divided by the batch size).

    Returns:
        A `TrainState` at step 0 with ``apply_fn`` and ``tx`` set.
    """
    info = datasets.info(config.data.get("name", "cifar10"))
    if steps_per_epoch is None:
        steps_per_epoch = data.num_train_steps(info.num_train, config.data.batch_size)
    model = make_model(_model_config(config, mesh))
    tx = make_optimizer(config.optim, config.num_epochs * steps_per_epoch)

    def init(rng: jax.Array) -> TrainState:
        variables = model.init(rng, jnp.zeros((1, *info.image_shape), jnp.float32), train=False)
        state = TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            tx=tx,
            batch_stats=variables.get("batch_stats", {}),
        )
        return state.replace(step=jnp.zeros((), jnp.int32))

    platform = mesh.devices.flat[0].platform
    return jax.jit(
        init,
        out_shardings=distributed.replicated(mesh),
        compiler_options=cpu_tuning.init_compiler_options(platform),
    )(rng)


def _model_config(config: Any, mesh: Mesh) -> Any:
    """``config.model`` resolved for ``mesh``.

    Sets the BatchNorm groups of ``bn_stats``, and keeps ``native_input_conv``
    only on one CPU device (XLA's sharding does not split its custom call).
    """
    model_config = config.model.copy_and_resolve_references()
    one_cpu = mesh.size == 1 and mesh.devices.flat[0].platform == "cpu"
    with model_config.unlocked():
        model_config.native_input_conv = bool(model_config.get("native_input_conv")) and one_cpu
        model_config.virtual_batch_size = distributed.batch_stats_group_size(
            config.model.get("bn_stats", "global"),
            config.data.batch_size,
            mesh,
            config.model.get("virtual_batch_size"),
        )
    return model_config
