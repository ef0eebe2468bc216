"""Shared pytest fixtures.

The suite runs on the CPU, as 8 fake devices (set before JAX is imported), so
that the sharded code paths are tested on every machine, and with the XLA flags that
``train.py`` runs with (`jbn.cpu_tuning`), so the tests check the code the
workbench actually executes. Random numbers come from the non-partitionable
threefry (faster to compile; see below), and float32 matmuls run at full
precision on every platform.
"""

from __future__ import annotations

import os

from jbn import cpu_tuning

# The suite is the CPU suite everywhere (CI has no accelerator): on a GPU
# machine JAX would otherwise pick its one GPU and the 8-device tests would fail.
# An explicit JAX_PLATFORMS (e.g. "cuda" for the single-device tests) wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
if os.environ.get(cpu_tuning.OPT_OUT_ENV) is None:
    os.environ["XLA_FLAGS"] = cpu_tuning.environment()["XLA_FLAGS"]

import gzip
import pathlib
import pickle
import runpy
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest

from jbn.experiments import sweep

# Random test inputs and initial parameters only: XLA:CPU compiled the
# partitionable threefry (JAX's default) about 4x slower per new shape (1.2 s vs
# 0.3 s), 44% of the compile time of test_models, test_linen and test_folding.
# No test depends on the particular values; the train.py subprocesses of
# test_multiprocess keep JAX's default.
jax.config.update("jax_threefry_partitionable", False)
# The tolerances are stated for float32 arithmetic. GPUs and TPUs run float32
# matmuls and convolutions in reduced precision by default (TF32, bf16 passes);
# on an H100 that moved a network's loss by 1.2e-4 relative. No-op on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

# CI turns skips for missing optional packages into failures; --strict-promotion.
pytest_plugins = ["run_modes", "pytester"]

REPO = pathlib.Path(__file__).resolve().parents[1]


def python_output_on_one_device(
    code: str, *args: str, pinned_to_one_cpu: bool = False, env: Mapping[str, str] | None = None
) -> bytes:
    """Standard output of ``python -c code args`` in a process with one CPU device.

    The child drops the suite's fake device count from ``XLA_FLAGS`` (XLA:CPU
    sizes the thread pool of 8 fake devices without regard to the CPUs the
    process may use) and, with ``pinned_to_one_cpu``, runs on one CPU only
    (the calling test skips where the OS cannot pin a process). ``env`` adds
    environment variables.
    """
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if pinned_to_one_cpu:
        if not hasattr(os, "sched_setaffinity"):
            pytest.skip("needs os.sched_setaffinity to pin a process to one CPU")
        code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n" + code
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        timeout=300,
        check=True,
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": " ".join(flags), **(env or {})},
    ).stdout


def overridden(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None = None, **fields: Any
) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted-path ``overrides`` and top-level ``fields`` set.

    E.g. ``overridden(config, {"data.batch_size": 0}, max_steps=6)``; as sweep
    variants are built (`jbn.experiments.sweep.variant_config`), so a field the
    config lacks is a KeyError, not a silent addition.
    """
    return sweep.variant_config(config, {**(overrides or {}), **fields})


def load_config(
    name: str = "tiny.py", overrides: Mapping[str, Any] | None = None, **fields: Any
) -> ml_collections.ConfigDict:
    """``configs/<name>``'s config, with `overridden`'s overrides."""
    config = runpy.run_path(str(REPO / "configs" / name))["get_config"]()
    return overridden(config, overrides, **fields)


@pytest.fixture
def tiny(cifar_fixture_dir: pathlib.Path) -> ml_collections.ConfigDict:
    """``configs/tiny.py`` on the CIFAR fixture: 10 steps per epoch, 2 epochs, checkpoints every 4."""
    return load_config("tiny.py", {"data.data_dir": str(cifar_fixture_dir)})


def write_cifar10_dir(
    path: str | pathlib.Path,
    num_train_per_batch: int = 64,
    num_test: int = 50,
    seed: int = 0,
) -> pathlib.Path:
    """Writes random images in the official CIFAR-10 python-pickle layout into `path`.

    Creates data_batch_1..5, test_batch and batches.meta: each batch is a dict with
    bytes keys b"data" (uint8 [n, 3072], channel-major rows), b"labels" (list of ints),
    b"filenames" and b"batch_label", pickled like the official files. Returns `path`.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def write(name: str, count: int, batch_label: str) -> None:
        entry = {
            b"batch_label": batch_label.encode(),
            b"labels": [int(label) for label in rng.integers(0, 10, count)],
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"filenames": [f"image_{name}_{i}.png".encode() for i in range(count)],
        }
        with open(path / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    for i in range(1, 6):
        write(f"data_batch_{i}", num_train_per_batch, f"training batch {i} of 5")
    write("test_batch", num_test, "testing batch 1 of 1")
    meta = {
        b"num_cases_per_batch": num_train_per_batch,
        b"label_names": [
            name.encode()
            for name in ("airplane automobile bird cat deer dog frog horse ship truck".split())
        ],
        b"num_vis": 3072,
    }
    with open(path / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return path


@pytest.fixture(scope="session")
def cifar_fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny CIFAR-10 directory: 5 x 64 train images, 50 test images."""
    return write_cifar10_dir(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py")


def write_cifar100_dir(
    path: str | pathlib.Path, num_train: int = 200, num_test: int = 40, seed: int = 0
) -> pathlib.Path:
    """Writes random images in the official CIFAR-100 python-pickle layout into `path`.

    Creates `train`, `test` and `meta` as the official archive has them: each
    batch a dict with b"filenames", b"batch_label", b"fine_labels" (0..99),
    b"coarse_labels" (0..19, fine // 5) and b"data" (uint8 [n, 3072],
    channel-major rows); `meta` holds b"fine_label_names" and
    b"coarse_label_names". Returns `path`.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def write(name: str, count: int) -> None:
        fine = [int(label) for label in rng.integers(0, 100, count)]
        entry = {
            b"filenames": [f"image_{name}_{i}.png".encode() for i in range(count)],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [label // 5 for label in fine],
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        }
        with open(path / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    write("train", num_train)
    write("test", num_test)
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    with open(path / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return path


def idx_bytes(array: np.ndarray) -> bytes:
    """`array` (uint8) as an IDX file: 0, 0, 0x08, ndim, big-endian uint32 dims, values."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_mnist_dir(
    path: str | pathlib.Path,
    num_train: int = 256,
    num_test: int = 40,
    seed: int = 0,
    gzipped: bool = True,
) -> pathlib.Path:
    """Writes random 28x28 digits as the four MNIST IDX files (``.gz`` or plain) into `path`."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, num_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        if gzipped:
            (path / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (path / name).write_bytes(idx_bytes(array))
    return path


@pytest.fixture(scope="session")
def cifar100_fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny CIFAR-100 directory: 200 train images, 40 test images."""
    return write_cifar100_dir(tmp_path_factory.mktemp("cifar100") / "cifar-100-python")


@pytest.fixture(scope="session")
def mnist_fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny MNIST directory of gzipped IDX files: 256 train images, 40 test images."""
    return write_mnist_dir(tmp_path_factory.mktemp("mnist"))
