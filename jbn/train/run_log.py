"""Per-epoch metrics of a run, one JSON object per line in ``workdir/metrics.jsonl``.

Each record holds at least ``epoch`` (fractional epochs done), ``step``,
``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``,
``images_per_sec``, ``lr`` and ``wall_time_s``. On resume the file is cut back
to the records at or before the restored step, so a killed and resumed run
has the same lines as a straight one.

The same functions keep a run's other step-indexed logs (``filename=``), e.g.
the step-wise test evaluations (`jbn.train.step_eval`) and the activation
probe (`jbn.train.activation_probe`): one JSON object per line, each with a
``step``.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

__all__ = ["METRICS_FILE", "append", "read", "truncate_after"]

METRICS_FILE = "metrics.jsonl"


def _path(workdir: str | os.PathLike, filename: str = METRICS_FILE) -> pathlib.Path:
    return pathlib.Path(workdir) / filename


def read(workdir: str | os.PathLike, filename: str = METRICS_FILE) -> list[dict[str, Any]]:
    """Returns the records of ``workdir/filename`` (empty if none)."""
    path = _path(workdir, filename)
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append(
    workdir: str | os.PathLike, record: Mapping[str, Any], filename: str = METRICS_FILE
) -> None:
    """Appends one record (plain numbers and strings) as a JSON line to ``workdir/filename``."""
    with open(_path(workdir, filename), "a") as f:
        f.write(json.dumps(dict(record), sort_keys=True) + "\n")


def truncate_after(workdir: str | os.PathLike, step: int, filename: str = METRICS_FILE) -> None:
    """Drops the records of steps after ``step`` (written after the last checkpoint)."""
    records = read(workdir, filename)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) == len(records):
        return
    path = _path(workdir, filename)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    os.replace(tmp, path)
