"""Process and device layout: multi-host start-up, the device mesh, batch placement.

Every training program here is written for a ``jax.sharding.Mesh`` from the
start, so one device, all devices of a host and many hosts run the same jitted
code: the batch is sharded over the ``"data"`` mesh axis, the train state is
replicated.

Example:
    >>> mesh = create_mesh({"data": -1})
    >>> mesh.axis_names
    ('data',)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "BATCH_STATS_MODES",
    "DATA_AXIS",
    "any_process",
    "assert_replicas_agree",
    "batch_sharding",
    "batch_stats_group_size",
    "create_mesh",
    "maybe_initialize_distributed",
    "preemption_sync_available",
    "put_batch",
    "replicated",
]

DATA_AXIS = "data"

# Environment variables read by `maybe_initialize_distributed` when no argument is given.
COORDINATOR_ENV = "JBN_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JBN_NUM_PROCESSES"
PROCESS_ID_ENV = "JBN_PROCESS_ID"


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-process JAX run when one is configured; no-op otherwise.

    THE place where ``jax.distributed.initialize`` is called for multi-host
    runs. It must run before any other JAX call. Arguments default to the
    environment variables ``JBN_COORDINATOR_ADDRESS`` (``host:port``),
    ``JBN_NUM_PROCESSES`` and ``JBN_PROCESS_ID``. With none of them set, the
    run stays single-process (on managed clusters such as Cloud TPU or SLURM,
    set ``JBN_COORDINATOR_ADDRESS=auto`` to let JAX detect everything).

    Args:
        coordinator_address: ``host:port`` of process 0, or ``"auto"``.
        num_processes: Total number of processes.
        process_id: Index of this process in ``[0, num_processes)``.

    Returns:
        True if ``jax.distributed.initialize`` was called.
    """
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV)
    if num_processes is None and os.environ.get(NUM_PROCESSES_ENV):
        num_processes = int(os.environ[NUM_PROCESSES_ENV])
    if process_id is None and os.environ.get(PROCESS_ID_ENV):
        process_id = int(os.environ[PROCESS_ID_ENV])
    if coordinator_address is None:
        if num_processes not in (None, 1):
            raise ValueError(
                f"num_processes={num_processes} needs a coordinator address "
                f"(flag --coordinator_address or ${COORDINATOR_ENV})."
            )
        return False
    if coordinator_address == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def create_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a device mesh from ``{axis_name: size}``; one size may be -1 (the rest).

    Without ``devices``, a mesh of explicit sizes that need fewer devices than
    a single-process run has takes the first ones (``{"data": 1}``: one device
    of a host with several); a size of -1 takes them all. A multi-process run
    uses every device of every process.

    Args:
        axes: Ordered axis sizes, e.g. ``config.mesh`` = ``{"data": -1}``.
        devices: Devices to use, all of them (default: ``jax.devices()``).

    Returns:
        A ``Mesh`` over the devices.

    Raises:
        ValueError: If the sizes do not fit the devices.
    """
    names = tuple(axes.keys())
    sizes = [int(axes[name]) for name in names]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {dict(axes)}.")
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"Mesh axis sizes must be positive or -1, got {dict(axes)}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if devices is None:
        devices = jax.devices()
        if -1 not in sizes and known < len(devices) and jax.process_count() == 1:
            devices = devices[:known]
    devices = list(devices)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"Mesh {dict(axes)} does not divide {len(devices)} devices.")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"Mesh {dict(zip(names, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
            f"have {len(devices)}."
        )
    # Auto axes: XLA propagates shardings from the jit in/out shardings (GSPMD), so
    # model code needs no sharding annotations.
    axis_types = (AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(sizes), names, axis_types, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the ``"data"`` mesh axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """Assembles this process's slice of a global batch into global ``jax.Array`` s.

    Works for one and for many processes: each process passes the rows it
    loaded (``jbn.train.data.train_batches(..., process_index, process_count)``) and
    the global batch is ``process_count`` times larger along axis 0.

    Args:
        batch: Pytree of host arrays with a leading per-process batch axis.
        mesh: The device mesh.

    Returns:
        The same pytree of global arrays sharded with ``batch_sharding(mesh)``.
    """
    sharding = batch_sharding(mesh)
    count = jax.process_count()

    def put(x: np.ndarray) -> jax.Array:
        global_shape = (x.shape[0] * count, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, batch)


BATCH_STATS_MODES = ("global", "local", "ghost")


def batch_stats_group_size(
    mode: str, global_batch_size: int, mesh: Mesh, virtual_batch_size: int | None = None
) -> int | None:
    """How many examples share BatchNorm statistics in training, per mode.

    - ``"global"``: the whole global batch, exactly as on one device (``None``).
    - ``"local"``: each device's share of the batch, like PyTorch DDP without
      SyncBatchNorm. The batch is split over ``"data"`` in contiguous blocks,
      so ghost groups of the per-device size are exactly the devices' shards
      and XLA computes their statistics without communication.
    - ``"ghost"``: fixed-size virtual batches (Hoffer et al. 2017) of
      ``virtual_batch_size`` examples.

    In every mode the running statistics are averaged over the groups, so they
    stay identical on every device.

    Args:
        mode: One of `BATCH_STATS_MODES`.
        global_batch_size: Examples per train step over all processes.
        mesh: The device mesh (its ``"data"`` axis splits the batch).
        virtual_batch_size: Group size for ``"ghost"``.

    Returns:
        The ``virtual_batch_size`` for ``jbn.BatchNorm`` (``None``: the whole batch).

    Raises:
        ValueError: On an unknown mode or sizes that do not divide the batch.
    """
    if mode not in BATCH_STATS_MODES:
        raise ValueError(f"Unknown batch-stats mode {mode!r}; expected one of {BATCH_STATS_MODES}.")
    if mode == "global":
        if virtual_batch_size is not None:
            raise ValueError(
                "virtual_batch_size is set but bn_stats='global'; use bn_stats='ghost'."
            )
        return None
    if mode == "local":
        devices = mesh.shape[DATA_AXIS]
        if global_batch_size % devices:
            raise ValueError(
                f"bn_stats='local' needs the batch size {global_batch_size} to divide "
                f"evenly over {devices} devices."
            )
        return global_batch_size // devices
    if virtual_batch_size is None or global_batch_size % virtual_batch_size:
        raise ValueError(
            f"bn_stats='ghost' needs a virtual_batch_size dividing the batch size "
            f"{global_batch_size}, got {virtual_batch_size}."
        )
    return virtual_batch_size


def assert_replicas_agree(tree: Any, what: str = "state") -> None:
    """Checks that every process holds the same values of a replicated pytree.

    A no-op in a single-process run. Uses
    ``jax.experimental.multihost_utils.assert_equal`` on each process's local
    copy, so a divergence between hosts fails loudly instead of silently.

    Raises:
        AssertionError: If two processes hold different values.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
    multihost_utils.assert_equal(local, f"{what} differs between processes")


def preemption_sync_available() -> bool:
    """Whether JAX's preemption sync runs: a multi-process run with its preemption service on.

    ``jax.distributed.initialize`` starts it unless ``jax_enable_preemption_service``
    is False (``JAX_ENABLE_PREEMPTION_SERVICE=false``); only then does JAX
    catch SIGTERM and ``multihost_utils.reached_preemption_sync_point`` work
    (orbax's ``reached_preemption`` then says False forever).
    """
    from jax._src import distributed as jax_distributed  # No public accessor.

    state = jax_distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is True on any process: a collective every process must call.

    A no-op (``flag`` itself) in a single-process run.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.bool_))))
