"""A run's config in its workdir (``config.json``), and the check that a resume keeps it.

Every start writes the config it runs with to ``workdir/config.json``. When
the workdir already holds checkpoints, `check_resume` first compares the new
config with that file: a checkpoint only makes sense with the model,
optimizer and data it was trained with, so any difference in a field whose
rule is not ``resumable`` (`jbn.train.config_schema.FIELDS`) stops the run
with a `ResumeMismatchError` naming the fields and both values; a field the
saved run had and the new config lacks differs too (``-> (absent)``), unless
it was None. The fields that may change are `jbn.train.config_schema.resumable_fields()`: the
length of the run (``num_epochs``, ``max_steps``), checkpoint cadence,
logging (``log_every_steps``, ``log.tensorboard``), where the data is and how it is fed (``data.data_dir``,
``data.download``, ``data.checksums``, ``data.eval_batch_size``,
``data.prefetch``), the device mesh and the implementation of the input
convolution.

Example:
    >>> notes = check_resume(workdir, config)  # doctest: +SKIP
    >>> write(workdir, config)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from jbn.train import config_schema

__all__ = [
    "ABSENT",
    "CONFIG_FILE",
    "ResumeMismatchError",
    "check_resume",
    "differences",
    "read",
    "write",
]

CONFIG_FILE = "config.json"


class ResumeMismatchError(config_schema.ConfigError):
    """The workdir's checkpoints were trained with a config that differs in a fixed field."""


def _as_json(config: Any) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists), as ``config.json`` stores it."""
    return json.loads(config.to_json_best_effort())


def read(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """Returns the parsed ``workdir/config.json``, or None if there is none."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write(workdir: str | os.PathLike, config: Any) -> None:
    """Writes ``config`` to ``workdir/config.json`` (atomically: a reader sees the old or new file)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json_best_effort(indent=2) + "\n")
    os.replace(tmp, path)


class _Absent:
    """A field the new config does not have (a model field: the model's default)."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


def differences(saved: dict[str, Any], config: Any) -> tuple[list, list]:
    """Compares a saved config (``config.json``) with ``config``, field by field.

    Every field of either is compared, except those the saved config lacks
    (written by an older version). A field only the saved config has differs
    unless it was None there: a model reads an absent field and a None one
    alike, as its default (`jbn.models.registry.make_model`).

    Returns:
        ``(fixed, changed)``: lists of ``(field, saved value, new value)`` for
        the fields that differ and may not change on resume, and for those
        that may; a field the new config lacks has the new value `ABSENT`.
    """
    old = dict(config_schema.leaves(saved))
    new = dict(config_schema.leaves(_as_json(config)))
    fixed, changed = [], []
    for path in old:  # The union but for fields the saved config lacks.
        value = new.get(path, None if old[path] is None else ABSENT)
        if old[path] == value:
            continue
        rule = config_schema.FIELDS.get(path)
        (changed if rule is not None and rule.resumable else fixed).append((path, old[path], value))
    return fixed, changed


def check_resume(workdir: str | os.PathLike, config: Any) -> list[str]:
    """Checks that ``config`` may resume the checkpoints in ``workdir``.

    Call it only when the workdir holds checkpoints.

    Args:
        workdir: The run directory.
        config: The config of the new run.

    Returns:
        Notes for the user: allowed changes with a side effect worth knowing
        (a longer one-cycle schedule), or that the workdir has no ``config.json``.

    Raises:
        ResumeMismatchError: If a field that may not change differs.
    """
    workdir = pathlib.Path(workdir)
    saved = read(workdir)
    if saved is None:
        return [f"{workdir} has checkpoints but no {CONFIG_FILE}: the config is not checked."]
    fixed, changed = differences(saved, config)
    if fixed:
        lines = [
            f"Cannot resume {workdir}: its checkpoints were trained with another config. "
            f"Fields that differ ({CONFIG_FILE} -> this run):"
        ]
        lines += [f"  {path}: {old!r} -> {new!r}" for path, old, new in fixed]
        lines += [
            "These fields set the shapes or meaning of the saved state. Resume with the "
            f"workdir's values, or start afresh with another --workdir (or delete "
            f"{workdir / 'checkpoints'}).",
            "Fields that may change on resume: "
            + ", ".join(config_schema.resumable_fields())
            + ".",
        ]
        raise ResumeMismatchError(lines)
    notes = []
    for path, old, new in changed:
        if path == "num_epochs" and config.optim.schedule != "constant":
            notes.append(
                f"num_epochs: {old} -> {new}; the {config.optim.schedule} learning-rate "
                f"schedule now spans {new} epochs, so the rate jumps at the resume step "
                "(config.max_steps splits a run without changing the schedule)."
            )
    return notes
