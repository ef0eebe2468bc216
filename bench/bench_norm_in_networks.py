"""BatchNorm inside networks: one train step, only the norm layer swapped.

SmallBNConvNet (as ``train.py`` runs it on one CPU device: the RGB layer on
`jbn.ops.native` where it builds, `jbn.ops.pooling.max_pool`) and He et al.'s
ResNet-20 (`jbn.models.resnet20`), each trained with SGD(lr=0.1, momentum=0.9)
on a batch of 128 and compiled with the options ``jbn.train.loop`` uses, with
three norm layers and nothing else changed (same convolutions, pooling,
optimizer, compile options):

- ``jbn.BatchNorm`` (momentum 0.9, epsilon 1e-5),
- ``flax.linen.BatchNorm`` (the same maths and arguments),
- none (``use_batch_norm=False``: the convolutions get a bias instead), which
  shows what normalisation costs in that network.

Competitors run side by side in one process, in interleaved rounds; the table
gives median ms/step, the per-round ratio flax / jbn (median and range over the
rounds) and each norm layer's cost, its step time minus the no-norm step's.

Run as ``train.py`` runs (the process re-executes itself with `jbn.cpu_tuning`'s
settings unless ``JBN_NO_CPU_TUNING`` is set, as ``bench.run_all`` does)::

  python -m bench.bench_norm_in_networks [--rounds 5] [--markdown out.md]
"""

from __future__ import annotations

from jbn import cpu_tuning

if __name__ == "__main__":
    # Before JAX is imported: the allocator and XLA flags train.py runs with.
    cpu_tuning.reexec_tuned()

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from bench import timing  # noqa: E402
from bench.bench_train_step import BATCH, jax_step  # noqa: E402
from jbn.models import SmallBNConvNet, resnet20  # noqa: E402

FLAX_NORM = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
NORMS = ("jbn.BatchNorm", "flax.linen.BatchNorm", "none")


def networks() -> dict[str, dict[str, nn.Module]]:
    """Each network with each norm layer (`NORMS`), all else equal."""
    native = jax.default_backend() == "cpu"
    small = functools.partial(SmallBNConvNet, native_input_conv=native)
    return {
        "SmallBNConvNet": {
            "jbn.BatchNorm": small(),
            "flax.linen.BatchNorm": small(norm=FLAX_NORM),
            "none": small(use_batch_norm=False),
        },
        "ResNet-20": {
            "jbn.BatchNorm": resnet20(),
            "flax.linen.BatchNorm": resnet20(norm=FLAX_NORM),
            "none": resnet20(use_batch_norm=False),
        },
    }


def table(name: str, samples: dict[str, list[float]]) -> list[str]:
    """Markdown rows of one network: ms/step, flax / this per round, cost of the norm layer."""
    flax_t, plain = samples["flax.linen.BatchNorm"], samples["none"]
    lines = []
    for norm in NORMS:
        ms = samples[norm]
        ratio = timing.format_spread(timing.ratio_spread(flax_t, ms))
        cost = statistics.median([a - b for a, b in zip(ms, plain, strict=True)])
        lines.append(
            f"| {name} | {norm} | {statistics.median(ms):.1f} | {ratio} | "
            + ("- |" if norm == "none" else f"{cost:.1f} |")
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--only", choices=("SmallBNConvNet", "ResNet-20"), default=None)
    parser.add_argument("--markdown", default=None, help="append a markdown table to this file")
    args = parser.parse_args()
    lines = [
        f"## Norm layer swapped inside networks (train step, batch {BATCH}, median of "
        f"{args.rounds} interleaved rounds; ratios per round: median (lowest-highest))",
        "",
        "| network | norm layer | ms/step | flax step / this step | this - no norm (ms) |",
        "|---|---|---|---|---|",
    ]
    for name, models in networks().items():
        if args.only not in (None, name):
            continue
        funcs = {norm: jax_step(model)[0] for norm, model in models.items()}
        samples = timing.interleaved_samples(
            funcs, rounds=args.rounds, min_seconds=args.min_seconds
        )
        lines += table(name, samples)
    timing.emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
