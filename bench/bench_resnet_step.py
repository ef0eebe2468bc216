"""ResNet-20 train step: jbn vs flax.linen vs PyTorch eager (NCHW, channels_last).

He et al.'s CIFAR ResNet-20 (shortcut "A", 0.27 M parameters), batch 128 of
32x32x3, SGD(lr=0.1, momentum=0.9), cross-entropy: the same maths in every
framework. "jbn" is `jbn.models.resnet20` with `jbn.BatchNorm`, "flax.linen"
the same network with ``flax.linen.BatchNorm``; both are jitted with the
options ``jbn.train.loop`` compiles its train step with. The PyTorch network is
written here in plain PyTorch (same layers, same shortcut). Competitors run
side by side in one process, in interleaved rounds, with a pause before each
timing (PyTorch's OpenMP workers spin after each call and would slow the JAX
step timed right after them); the median images/s and the ratios to jbn are
printed, plus the compiled temp memory of the jitted steps. On the CPU a row
"jbn, XLA's default fusion emitters" compiles jbn's step without the train-step
option of `jbn.cpu_tuning` (measured on SmallBNConvNet only).

Run as ``train.py`` runs (the process re-executes itself with `jbn.cpu_tuning`'s
settings, as ``bench.run_all`` does)::

  python -m bench.bench_resnet_step [--rounds 5] [--markdown out.md]
"""

from __future__ import annotations

from jbn import cpu_tuning

if __name__ == "__main__":
    # Before JAX is imported: the allocator and XLA flags train.py runs with.
    cpu_tuning.reexec_tuned()

import argparse  # noqa: E402
import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from bench import timing  # noqa: E402
from bench.bench_train_step import BATCH, jax_step  # noqa: E402
from jbn.models import resnet20  # noqa: E402


def torch_resnet20(torch):
    """ResNet-20 (shortcut "A") in plain PyTorch, NCHW."""
    functional = torch.nn.functional

    class Block(torch.nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(cout)
            self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            out = functional.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if self.stride != 1 or self.extra:
                half = self.extra // 2
                x = x[:, :, :: self.stride, :: self.stride]
                x = functional.pad(x, (0, 0, 0, 0, half, self.extra - half))
            return functional.relu(out + x)

    layers = [torch.nn.Conv2d(3, 16, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(16)]
    layers.append(torch.nn.ReLU())
    cin = 16
    for stage, width in enumerate((16, 32, 64)):
        for index in range(3):
            layers.append(Block(cin, width, 2 if stage > 0 and index == 0 else 1))
            cin = width
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)]
    return torch.nn.Sequential(*layers)


def torch_step(channels_last):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(2)
    device = timing.torch_device()
    return timing.torch_train_step(torch_resnet20(torch), device, BATCH, channels_last)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds before each timing")
    parser.add_argument("--markdown", default=None, help="append a markdown table to this file")
    args = parser.parse_args()
    jbn_run, jbn_compiled = jax_step(resnet20())
    flax_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
    flax_run, flax_compiled = jax_step(resnet20(norm=flax_norm))
    funcs = {"jbn": jbn_run, "flax.linen": flax_run}
    if cpu_tuning.train_step_compiler_options(jax.default_backend()):
        # The train step's CPU compile option (the older fusion emitter) was measured
        # on SmallBNConvNet; this row shows what it does to a deep network.
        funcs["jbn, XLA's default fusion emitters"] = jax_step(resnet20(), compiler_options={})[0]
    for name, channels_last in (("torch NCHW", False), ("torch channels_last", True)):
        run = torch_step(channels_last)
        if run is not None:
            funcs[name] = run
    medians = timing.interleaved_medians(
        funcs, rounds=args.rounds, min_seconds=args.min_seconds, pause_seconds=args.pause
    )
    ips = {name: BATCH / (ms / 1e3) for name, ms in medians.items()}
    lines = [
        f"## ResNet-20 train step (batch {BATCH}, SGD momentum; median of {args.rounds} "
        "interleaved rounds)",
        "",
        "| implementation | ms/step | images/s | jbn speed-up (x) |",
        "|---|---|---|---|",
    ]
    for name, ms in medians.items():
        lines.append(f"| {name} | {ms:.1f} | {ips[name]:.0f} | {ips['jbn'] / ips[name]:.2f} |")
    temp = {
        name: c.memory_analysis().temp_size_in_bytes / 2**20
        for name, c in (("jbn", jbn_compiled), ("flax.linen", flax_compiled))
    }
    lines += [
        "",
        "Compiled train-step temp memory (`memory_analysis().temp_size_in_bytes`): "
        + ", ".join(f"{name} {mib:.1f} MiB" for name, mib in temp.items())
        + f" (jbn / flax = {temp['jbn'] / temp['flax.linen']:.2f}).",
    ]
    timing.emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
