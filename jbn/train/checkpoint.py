"""Checkpoints of the train state with orbax-checkpoint.

A thin layer over ``orbax.checkpoint.CheckpointManager``: steps are saved
atomically (orbax writes to a temporary directory and renames it), at most
``max_to_keep`` are kept, and ``restore_latest`` puts the newest one back into
a state of the same structure and sharding. All processes of a multi-process
run must call `save` and `restore_latest` together; orbax coordinates them.

A step holds two items: ``state`` (the pytree of arrays) and ``progress``, a
small JSON dict saved in the same atomic step (the loop keeps the running
sums of the epoch's train metrics there, so a resumed epoch reports the same
averages as a straight one). Checkpoints written before ``progress`` existed
(one unnamed item) are still restored, with an empty ``progress``.

Saving is synchronous on purpose: the train step donates the state buffers,
so a background save must not still be reading them when the next step runs.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

__all__ = ["CheckpointMismatchError", "Checkpointer"]

_LEGACY_ITEM = "default"  # The one unnamed item of checkpoints without ``progress``.

State = TypeVar("State")


def _abstract(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` with the sharding of each array leaf."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not fit the state it is restored into (another model or optimizer)."""


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

    def save(self, step: int, state: Any, progress: Mapping[str, Any] | None = None) -> None:
        """Saves ``state`` (any pytree of arrays, e.g. a TrainState) as ``step``.

        Args:
            step: Step number naming the checkpoint; an existing one is kept.
            state: The pytree to save.
            progress: JSON-serialisable values saved with it (see `restore_progress`).
        """
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                progress=ocp.args.JsonSave(dict(progress or {})),
            ),
        )
        self._manager.wait_until_finished()

    def _legacy(self, step: int) -> pathlib.Path | None:
        path = pathlib.Path(self.directory, str(step))
        return path / _LEGACY_ITEM if not (path / "state").is_dir() else None

    def restore(self, step: int, target: State) -> State:
        """Restores ``step`` into the structure, dtypes and shardings of ``target``.

        Raises:
            CheckpointMismatchError: If the saved arrays do not fit ``target``
                (shapes or structure of another model or optimizer).
        """
        try:
            legacy = self._legacy(step)
            if legacy is not None:
                with ocp.StandardCheckpointer() as checkpointer:
                    return checkpointer.restore(legacy, _abstract(target))
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)))
            )
            return restored["state"]
        except (ValueError, KeyError) as e:
            text = str(e).strip() or type(e).__name__
            reason = text.splitlines()[0].split(". ")[0].rstrip(".:")
            raise CheckpointMismatchError(
                f"Checkpoint {step} in {self.directory} does not fit the state of this config "
                f"({reason[:300]}). Resume with the config it was trained with, or start "
                "afresh with another --workdir."
            ) from e

    def restore_progress(self, step: int) -> dict[str, Any]:
        """Returns the ``progress`` dict saved with ``step`` (empty for older checkpoints)."""
        if self._legacy(step) is not None:
            return {}
        restored = self._manager.restore(
            step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())
        )
        return dict(restored["progress"] or {})

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

    def reached_preemption(self, step: int) -> bool:
        """Whether all processes have reached the step JAX's preemption sync agreed on.

        Call it after every train step with that step, on every process (`save`
        reports its step too; see `jbn.train.preemption`). False in
        single-process runs.
        """
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        """Waits for pending work and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
