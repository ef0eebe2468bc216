"""SmallBNConvNet train step: jbn vs flax.linen vs PyTorch eager (NCHW, channels_last).

Batch 128 of 32x32x3, SGD(lr=0.1, momentum=0.9), cross-entropy; the same maths
in every framework. Competitors run side by side in one process in interleaved
rounds, with a pause before each timing (PyTorch's OpenMP workers spin after
each call and would slow the JAX step timed right after them); the median images/s and the ratios to jbn are printed, plus the
compiled temp memory of the jitted steps (``memory_analysis()``). "jbn" is
the network as ``train.py`` runs it on one CPU device: its RGB input layer runs
the compiled kernel of `jbn.ops.native` (when a C++ compiler is there to build it).
The rows "jbn, PatchConv input layer" and "jbn, nn.Conv input layer" run that
layer as XLA's patches @ kernel (`jbn.ops.conv.PatchConv`) and as
``flax.linen.Conv``. All JAX steps are compiled with the options
``jbn.train.loop`` uses for its train step
(`jbn.cpu_tuning.train_step_compiler_options`).

On a GPU, PyTorch runs there too (`bench.timing.torch_device`).

  python -m bench.bench_train_step [--rounds 5] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import optax

from bench import timing
from jbn import cpu_tuning
from jbn.models import SmallBNConvNet

BATCH = 128


def _flax_pool(x, window):
    return nn.max_pool(x, (window, window), (window, window))


def jax_step(model, compiler_options=None):
    """Returns (run, compiled) for a jitted, donated SGD step of ``model``.

    ``compiler_options`` default to those ``jbn.train.loop`` compiles its train step with.
    """
    images = jax.random.normal(jax.random.key(0), (BATCH, 32, 32, 3))
    labels = jax.random.randint(jax.random.key(1), (BATCH,), 0, 10)
    variables = model.init(jax.random.key(2), images, train=False)
    tx = optax.sgd(0.1, momentum=0.9)
    state = (variables["params"], variables.get("batch_stats", {}), tx.init(variables["params"]))

    def step(state, images, labels):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates.get("batch_stats", {})

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    # Compiled as jbn.train.loop compiles its train step (same options for jbn and flax).
    options = compiler_options
    if options is None:
        options = cpu_tuning.train_step_compiler_options(jax.default_backend())
    jitted = jax.jit(step, donate_argnums=0, compiler_options=options)
    compiled = jitted.lower(state, images, labels).compile()
    holder = [state]

    def run():
        holder[0], loss = jitted(holder[0], images, labels)
        loss.block_until_ready()

    return run, compiled


def torch_step(channels_last):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(2)
    device = timing.torch_device()
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 8 * 8, 10),
    )
    return timing.torch_train_step(net, device, BATCH, channels_last)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds before each timing")
    parser.add_argument("--markdown", default=None, help="append a markdown table to this file")
    args = parser.parse_args()
    # As train.py runs it on one device: the RGB layer natively on the CPU (jbn.ops.native).
    native = jax.default_backend() == "cpu"
    jbn_run, jbn_compiled = jax_step(SmallBNConvNet(native_input_conv=native))
    # The RGB layer as XLA's patches @ kernel (PatchConv), and as nn.Conv.
    jbn_xla_run, jbn_xla_compiled = jax_step(SmallBNConvNet())
    jbn_conv_run, jbn_conv_compiled = jax_step(SmallBNConvNet(patch_conv_channels=0))
    flax_model = SmallBNConvNet(
        norm=functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5),
        pool=_flax_pool,
        patch_conv_channels=0,
    )
    flax_run, flax_compiled = jax_step(flax_model)
    funcs = {
        "jbn": jbn_run,
        "jbn, PatchConv input layer": jbn_xla_run,
        "jbn, nn.Conv input layer": jbn_conv_run,
        "flax.linen": flax_run,
    }
    for name, channels_last in (("torch NCHW", False), ("torch channels_last", True)):
        run = torch_step(channels_last)
        if run is not None:
            funcs[name] = run
    medians = timing.interleaved_medians(
        funcs, rounds=args.rounds, min_seconds=1.0, pause_seconds=args.pause
    )
    ips = {name: BATCH / (ms / 1e3) for name, ms in medians.items()}
    lines = [
        f"## SmallBNConvNet train step (batch {BATCH}, SGD momentum; median of {args.rounds} interleaved rounds)",
        "",
        "| implementation | ms/step | images/s | jbn speed-up (x) |",
        "|---|---|---|---|",
    ]
    for name, ms in medians.items():
        lines.append(f"| {name} | {ms:.2f} | {ips[name]:.0f} | {ips['jbn'] / ips[name]:.2f} |")
    compiled = {
        "jbn": jbn_compiled,
        "jbn, PatchConv input layer": jbn_xla_compiled,
        "jbn, nn.Conv input layer": jbn_conv_compiled,
        "flax.linen": flax_compiled,
    }
    temp = {name: c.memory_analysis().temp_size_in_bytes / 2**20 for name, c in compiled.items()}
    lines += [
        "",
        "Compiled train-step temp memory (`memory_analysis().temp_size_in_bytes`): "
        + ", ".join(f"{name} {mib:.2f} MiB" for name, mib in temp.items())
        + f" (jbn / flax = {temp['jbn'] / temp['flax.linen']:.2f}).",
    ]
    timing.emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
