"""Train step of SmallBNConvNet with jbn.ops.pooling.max_pool vs flax.linen.max_pool.

Runs both jitted train steps (batch 128, CIFAR-sized random data, augmentation
on) side by side in one process, in interleaved rounds, and prints the median
images/s and the ratio. Usage: ``python -m bench.bench_pooling [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import runpy
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from jbn.models import SmallBNConvNet
from jbn.ops.pooling import max_pool
from jbn.train import distributed, loop

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"


def reduce_window_pool(x: jax.Array, window: int) -> jax.Array:
    return nn.max_pool(x, (window, window), strides=(window, window), padding="VALID")


def make_runner(pool, config, mesh, batch):
    state = loop.create_train_state(config, jax.random.key(0), mesh)
    state = state.replace(apply_fn=SmallBNConvNet(pool=pool).apply)
    step = loop.make_train_step(config, mesh)
    rng = jax.random.key(1)

    def run(num_steps: int) -> float:
        nonlocal state
        start = time.perf_counter()
        for _ in range(num_steps):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
        return num_steps * config.data.batch_size / (time.perf_counter() - start)

    run(3)  # Compile and warm up.
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    config = runpy.run_path(str(CONFIG))["get_config"]()
    mesh = distributed.create_mesh(config.mesh)
    rng = np.random.default_rng(0)
    batch = distributed.put_batch(
        {
            "image": rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, 128).astype(np.int32),
        },
        mesh,
    )
    runners = {"jbn max_pool": make_runner(max_pool, config, mesh, batch)}
    runners["nn.max_pool"] = make_runner(reduce_window_pool, config, mesh, batch)
    results = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            results[name].append(run(args.steps))
    env = os.environ.get("MALLOC_MMAP_THRESHOLD_", "unset")
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, MALLOC_MMAP_THRESHOLD_={env}")
    medians = {name: statistics.median(v) for name, v in results.items()}
    for name, value in medians.items():
        print(f"{name:>12}: {value:8.0f} images/s (median of {args.rounds} x {args.steps} steps)")
    print(f"ratio jbn/nn: {medians['jbn max_pool'] / medians['nn.max_pool']:.2f}x")


if __name__ == "__main__":
    main()
