"""BatchNorm alone: jbn vs flax.linen.BatchNorm vs torch (channels_last) vs a memory copy.

Forward and forward+backward (training mode), at the two BatchNorm shapes of
the seed CNN (batch 128) and one large shape. The backward pass is called in
the two ways training code calls it: ``jax.vjp`` with an explicit output
gradient, and ``jax.grad`` of a scalar loss (``vdot(y, g)``) with respect to
the input and the parameters (on XLA:CPU both compile to the same operations;
the script checks and says so under the table). Competitors run side by side in one process, in
interleaved rounds, with a pause before each timing (PyTorch's OpenMP workers
spin after each call and would slow whatever is timed right after them);
medians are reported with jbn's time as a fraction of the others', per round:
median (lowest-highest).

On a GPU, PyTorch runs there too (`bench.timing.torch_device`).

  python -m bench.bench_batchnorm [--rounds 7] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import re
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp

import jbn
from bench import timing

SHAPES = [(128, 32, 32, 16), (128, 16, 16, 32), (64, 56, 56, 64)]


def jax_cases(shape):
    x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
    dy = jax.random.normal(jax.random.key(1), shape)
    c = shape[-1]
    params, stats = jbn.init_params(c), jbn.init_batch_stats(c)
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    flax_vars = flax_bn.init(jax.random.key(0), x)

    def jbn_fwd(x, params, stats):
        return jbn.batch_norm(x, params, stats, training=True, momentum=0.9)

    def flax_fwd(x, params, stats):
        return flax_bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])

    def fwd_bwd(fwd):
        def step(x, params, stats, dy):
            (y, new_stats), vjp = jax.vjp(lambda x, p: fwd(x, p, stats), x, params)
            zeros = jax.tree.map(jnp.zeros_like, new_stats)
            dx, dparams = vjp((dy, zeros))
            return dx, dparams, new_stats

        return jax.jit(step)

    def grad_of_loss(fwd):
        def loss(x, params, stats, dy):
            y, new_stats = fwd(x, params, stats)
            return jnp.vdot(y, dy), new_stats

        def step(x, params, stats, dy):
            (dx, dparams), new_stats = jax.grad(loss, (0, 1), has_aux=True)(x, params, stats, dy)
            return dx, dparams, new_stats

        return jax.jit(step)

    copy = jax.jit(lambda x: x + 0.0)
    flax_args = (x, flax_vars["params"], flax_vars["batch_stats"])
    cases = {
        "jbn fwd": (jax.jit(jbn_fwd), (x, params, stats)),
        "flax fwd": (jax.jit(flax_fwd), flax_args),
        "jbn vjp": (fwd_bwd(jbn_fwd), (x, params, stats, dy)),
        "flax vjp": (fwd_bwd(flax_fwd), (*flax_args, dy)),
        "jbn grad": (grad_of_loss(jbn_fwd), (x, params, stats, dy)),
        "flax grad": (grad_of_loss(flax_fwd), (*flax_args, dy)),
        "memory copy": (copy, (x,)),
    }
    same = {
        impl: _program(cases[f"{impl} vjp"]) == _program(cases[f"{impl} grad"])
        for impl in ("jbn", "flax")
    }
    return {name: timing.jax_callable(fn, *args) for name, (fn, args) in cases.items()}, same


def _program(case) -> str:
    """The compiled program's operations, without names, numbering or metadata."""
    fn, args = case
    text = fn.lower(*args).compile().as_text()
    text = re.sub(r", metadata=\{[^}]*\}", "", text[text.index("ENTRY") :])
    return re.sub(r"\.\d+\b", "", text.split("\n", 1)[1])


def torch_cases(shape):
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(2)
    device = timing.torch_device()
    n, h, w, c = shape
    x = torch.randn(n, c, h, w, device=device).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(n, c, h, w, device=device).contiguous(memory_format=torch.channels_last)
    weight = torch.ones(c, device=device, requires_grad=True)
    bias = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)

    def fwd():
        with torch.no_grad():
            torch.nn.functional.batch_norm(x, rm, rv, weight, bias, training=True, momentum=0.1)

    xg = x.detach().requires_grad_(True)

    def fwd_bwd():
        y = torch.nn.functional.batch_norm(xg, rm, rv, weight, bias, training=True, momentum=0.1)
        y.backward(dy)
        xg.grad = weight.grad = bias.grad = None

    return {
        "torch fwd": timing.torch_callable(fwd, device),
        "torch bwd": timing.torch_callable(fwd_bwd, device),
    }


OPS = (
    ("fwd", "fwd", "fwd"),
    ("fwd+bwd, jax.vjp", "vjp", "bwd"),
    ("fwd+bwd, jax.grad", "grad", "bwd"),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pause", type=float, default=0.1, help="seconds before each timing")
    parser.add_argument("--markdown", default=None, help="append a markdown table to this file")
    args = parser.parse_args()
    lines = [
        "## BatchNorm alone (training mode, float32, median ms; jbn / other: jbn's time as a "
        f"fraction of the other's, per round over {args.rounds} interleaved rounds: "
        "median (lowest-highest))",
        "",
        "| shape (NHWC) | op | jbn | flax | torch CL | memory copy | jbn / flax | jbn / torch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    same_programs = []
    for shape in SHAPES:
        jax_funcs, same = jax_cases(shape)
        same_programs += [
            f"{impl} at {shape}: {'yes' if ok else 'no'}" for impl, ok in same.items()
        ]
        funcs = {**jax_funcs, **torch_cases(shape)}
        samples = timing.interleaved_samples(funcs, rounds=args.rounds, pause_seconds=args.pause)
        med = {name: statistics.median(values) for name, values in samples.items()}
        for label, jax_op, torch_op in OPS:
            ours = samples[f"jbn {jax_op}"]
            flax_ratio = timing.format_spread(timing.ratio_spread(ours, samples[f"flax {jax_op}"]))
            torch_t = samples.get(f"torch {torch_op}")
            torch_ratio = (
                "-" if torch_t is None else timing.format_spread(timing.ratio_spread(ours, torch_t))
            )
            torch_med = float("nan") if torch_t is None else med[f"torch {torch_op}"]
            lines.append(
                f"| {shape} | {label} | {med[f'jbn {jax_op}']:.3f} | {med[f'flax {jax_op}']:.3f} "
                f"| {torch_med:.3f} | {med['memory copy']:.3f} | {flax_ratio} | {torch_ratio} |"
            )
    lines += [
        "",
        "The two calling forms compile to the same operations (the optimized programs "
        "compared without names): " + ", ".join(same_programs) + ".",
    ]
    timing.emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
