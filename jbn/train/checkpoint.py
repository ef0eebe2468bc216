"""Checkpoints of the train state with orbax-checkpoint.

A thin layer over ``orbax.checkpoint.CheckpointManager``: steps are saved
atomically (orbax writes to a temporary directory and renames it), at most
``max_to_keep`` are kept, and ``restore_latest`` puts the newest one back into
a state of the same structure and sharding. All processes of a multi-process
run must call `save` and `restore_latest` together; orbax coordinates them.

Saving is synchronous on purpose: the train step donates the state buffers,
so a background save must not still be reading them when the next step runs.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]

State = TypeVar("State")


def _abstract(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` with the sharding of each array leaf."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores train states under one directory.

    Args:
        directory: Where step directories live (created if missing).
        max_to_keep: Number of most recent checkpoints kept (None: all).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=False,
            ),
        )

    def latest_step(self) -> int | None:
        """Returns the newest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Returns the saved steps in increasing order."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Saves ``state`` (any pytree of arrays, e.g. a TrainState) as ``step``.

        Args:
            step: Step number naming the checkpoint; an existing one is kept.
            state: The pytree to save.
        """
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state))
        self._manager.wait_until_finished()

    def restore(self, step: int, target: State) -> State:
        """Restores ``step`` into the structure, dtypes and shardings of ``target``."""
        return self._manager.restore(step, args=ocp.args.StandardRestore(_abstract(target)))

    def restore_latest(self, target: State) -> tuple[State, int | None]:
        """Restores the newest checkpoint, or returns ``target`` unchanged if none.

        Args:
            target: A state whose structure, dtypes and shardings the
                checkpoint must have (e.g. a freshly initialised TrainState).

        Returns:
            ``(state, step)``, with ``step=None`` when nothing was restored.
        """
        step = self.latest_step()
        if step is None:
            return target, None
        return self.restore(step, target), step

    def close(self) -> None:
        """Waits for pending work and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
