"""Eval step of SmallBNConvNet: BatchNorm folded into the convolutions vs not.

Both jitted eval steps (batch 1000, random CIFAR-sized images) run side by side
in one process, in interleaved rounds; prints the median milliseconds per step,
the ratio, and the largest logit difference.
Usage: ``python -m bench.bench_folding [--rounds 7] [--batch 1000]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench import timing
from jbn.models import SmallBNConvNet
from jbn.tools.folding import fold_small_bn_convnet


def _blocking(fn):
    return lambda: jax.block_until_ready(fn())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--min-seconds", type=float, default=0.5)
    args = parser.parse_args()

    images = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
    model, baseline = SmallBNConvNet(), SmallBNConvNet(use_batch_norm=False)
    variables = model.init(jax.random.key(1), images[:1], train=False)
    # Running statistics of a real (train-mode) pass, so the BN is non-trivial.
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    folded = fold_small_bn_convnet(variables, epsilon=model.epsilon)

    eval_bn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    eval_folded = jax.jit(lambda v, x: baseline.apply(v, x, train=False))
    runs = {
        "unfolded": lambda: eval_bn(variables, images),
        "folded": lambda: eval_folded(folded, images),
    }
    diff = float(jnp.max(jnp.abs(runs["unfolded"]() - runs["folded"]())))
    funcs = {name: _blocking(run) for name, run in runs.items()}
    medians = timing.interleaved_medians(funcs, rounds=args.rounds, min_seconds=args.min_seconds)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, batch {args.batch}")
    for name, value in medians.items():
        print(f"{name:>9}: {value:8.2f} ms/step (median of {args.rounds} rounds)")
    print(f"speed-up folded vs unfolded: {medians['unfolded'] / medians['folded']:.2f}x")
    print(f"max |logit difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
