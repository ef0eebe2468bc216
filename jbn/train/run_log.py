"""Per-epoch metrics of a run, one JSON object per line in ``workdir/metrics.jsonl``.

Each record holds at least ``epoch`` (fractional epochs done), ``step``,
``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``,
``images_per_sec``, ``lr`` and ``wall_time_s``. On resume the file is cut back
to the records at or before the restored step, so a killed and resumed run
has the same lines as a straight one.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

__all__ = ["METRICS_FILE", "append", "read", "truncate_after"]

METRICS_FILE = "metrics.jsonl"


def _path(workdir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(workdir) / METRICS_FILE


def read(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Returns the records of ``workdir/metrics.jsonl`` (empty if none)."""
    path = _path(workdir)
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Appends one record (plain numbers and strings) as a JSON line."""
    with open(_path(workdir), "a") as f:
        f.write(json.dumps(dict(record), sort_keys=True) + "\n")


def truncate_after(workdir: str | os.PathLike, step: int) -> None:
    """Drops the records of steps after ``step`` (written after the last checkpoint)."""
    records = read(workdir)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) == len(records):
        return
    tmp = _path(workdir).with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    os.replace(tmp, _path(workdir))
