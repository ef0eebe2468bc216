"""The ``train.py`` command lines the subprocess tests run (test_preemption, test_multiprocess)."""

from __future__ import annotations

import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def train_command(
    workdir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *overrides: str,
    config: str = "tiny.py",
) -> list[str]:
    """``python train.py --config configs/<config>`` on ``data_dir`` into ``workdir``.

    Every path is absolute, so the command runs from any working directory.

    Args:
        workdir: The run's ``--workdir``.
        data_dir: ``--config.data.data_dir`` (e.g. the CIFAR fixture).
        *overrides: Further flags, e.g. ``"--config.max_steps=4"``.
        config: The config file in ``configs/``.
    """
    return [
        sys.executable,
        str(REPO / "train.py"),
        "--config",
        str(REPO / "configs" / config),
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *overrides,
    ]
