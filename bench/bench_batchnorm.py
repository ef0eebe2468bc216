"""BatchNorm alone: jbn vs flax.linen.BatchNorm vs torch (channels_last) vs a memory copy.

Forward and forward+backward (training mode), at the two BatchNorm shapes of
the seed CNN (batch 128) and one large shape. Competitors run side by side in
one process, in interleaved rounds; medians are reported with ratios to jbn.

On a GPU, PyTorch runs there too (`bench.timing.torch_device`).

  python -m bench.bench_batchnorm [--rounds 7] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

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

    copy = jax.jit(lambda x: x + 0.0)
    cases = {
        "jbn fwd": (jax.jit(jbn_fwd), (x, params, stats)),
        "flax fwd": (jax.jit(flax_fwd), (x, flax_vars["params"], flax_vars["batch_stats"])),
        "jbn fwd+bwd": (fwd_bwd(jbn_fwd), (x, params, stats, dy)),
        "flax fwd+bwd": (fwd_bwd(flax_fwd), (x, flax_vars["params"], flax_vars["batch_stats"], dy)),
        "memory copy": (copy, (x,)),
    }
    return {name: timing.jax_callable(fn, *args) for name, (fn, args) in cases.items()}


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
        "torch fwd+bwd": timing.torch_callable(fwd_bwd, device),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--markdown", default=None, help="append a markdown table to this file")
    args = parser.parse_args()
    lines = ["## BatchNorm alone (training mode, float32, median ms; ratio = other / jbn)", ""]
    lines.append(
        "| shape (NHWC) | op | jbn | flax | torch CL | memory copy | flax/jbn | torch/jbn |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        funcs = {**jax_cases(shape), **torch_cases(shape)}
        med = timing.interleaved_medians(funcs, rounds=args.rounds)
        for op in ("fwd", "fwd+bwd"):
            ours, flax_t = med[f"jbn {op}"], med[f"flax {op}"]
            torch_t = med.get(f"torch {op}", float("nan"))
            lines.append(
                f"| {shape} | {op} | {ours:.3f} | {flax_t:.3f} | {torch_t:.3f} | {med['memory copy']:.3f} "
                f"| {flax_t / ours:.2f}x | {torch_t / ours:.2f}x |"
            )
    timing.emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
