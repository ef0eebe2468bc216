"""Per-feature mean and variance in one read of x or two: XLA:CPU's forms and jbn's kernel.

Off the CPU kernel, the exact variance jbn computes reads x twice with XLA:
the mean, then the squared deviations from it (`statistics.two_pass_moments`).
On one CPU device `jbn.moments` runs `jbn.native.moments`, a compiled kernel
that reads x once (shifted sums around a pivot from the data). Forms that
XLA compiles to one read either lose exactness (``E[x^2] - E[x]^2``, flax's
default) or need both sums from the same pass:

- shifted sums around a pivot taken from the data (``x[0]``, under
  ``stop_gradient``): ``sum(x - p)`` and ``sum((x - p)^2)``, two sibling
  reductions over the same input, which a compiler may fuse into one pass;
- the same two sums as one HLO reduction: a variadic ``lax.reduce``, the
  two arrays stacked, or packed into one complex number.

For each form the table gives its time as a fraction of the two passes (same process, interleaved rounds: median (lowest-highest)), the
relative variance error against float64 at ``|mean| / std = 1e4`` (float32),
and the compiled program: how many of its instructions read ``x`` and how
many full-size arrays it writes.

  python -m bench.bench_one_read [--rounds 7] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import re
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench import timing
from jbn.core import statistics as jbn_statistics
from jbn.native import moments as native_moments

SHAPES = [(128, 32, 32, 16), (64, 56, 56, 64)]


def _rows(x):
    return x.reshape(-1, x.shape[-1])


def _finish(s1, s2, n, pivot=0.0):
    mean = s1 / n
    return pivot + mean, jnp.maximum(s2 / n - jnp.square(mean), 0)


def two_pass(x):
    count, mean, m2, _ = jbn_statistics.two_pass_moments(x, None, (0, 1, 2), False)
    return mean, m2 / count


def native_kernel(x):
    mean, m2, _ = native_moments.moments(_rows(x))
    return mean, m2 / _rows(x).shape[0]


def sum_and_squares(x):
    rows = _rows(x)
    return _finish(jnp.sum(rows, 0), jnp.sum(jnp.square(rows), 0), rows.shape[0])


def _pivot(rows):
    return lax.stop_gradient(rows[0])


def pivot_siblings(x):
    rows = _rows(x)
    pivot = _pivot(rows)
    # Distinct subtractions, so that XLA's CSE leaves each fused in its reduction.
    s1 = jnp.sum(rows - pivot, 0)
    s2 = jnp.sum(jnp.square(rows + (-pivot)), 0)
    return _finish(s1, s2, rows.shape[0], pivot)


def pivot_variadic(x):
    rows = _rows(x)
    pivot = _pivot(rows)
    d = rows - pivot
    zero = jnp.zeros((), x.dtype)
    s1, s2 = lax.reduce((d, d * d), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), (0,))
    return _finish(s1, s2, rows.shape[0], pivot)


def pivot_stacked(x):
    rows = _rows(x)
    pivot = _pivot(rows)
    d = rows - pivot
    s1, s2 = jnp.sum(jnp.stack([d, d * d]), 1)
    return _finish(s1, s2, rows.shape[0], pivot)


def pivot_complex(x):
    rows = _rows(x)
    pivot = _pivot(rows)
    d = rows - pivot
    s = jnp.sum(lax.complex(d, d * d), 0)
    return _finish(s.real, s.imag, rows.shape[0], pivot)


TWO_PASSES = "two passes (XLA, jbn off the CPU kernel)"
FORMS = {
    TWO_PASSES: two_pass,
    "one read: jbn.native.moments (jbn.moments on one CPU device)": native_kernel,
    "sum and sum of squares, one pass each (flax)": sum_and_squares,
    "pivot: sum(x - p), sum((x - p)^2), sibling reductions": pivot_siblings,
    "pivot: one variadic lax.reduce": pivot_variadic,
    "pivot: the two arrays stacked, one reduction": pivot_stacked,
    "pivot: packed into a complex number, one reduction": pivot_complex,
}


def compiled_reads_and_writes(fn, x) -> tuple[int, int]:
    """(instructions of the compiled program that read ``x``, full-size arrays written).

    A bitcast (a free reshape) of ``x`` counts as ``x``; bitcasts themselves are
    not counted.
    """
    text = jax.jit(fn).lower(x).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    aliases = {re.search(r"%(\S+) = f32\[[\d,]+\]\S* parameter\(0\)", entry).group(1)}
    reads = writes = 0
    for line in entry.splitlines()[1:]:
        match = re.match(r"\s*(?:ROOT )?%(\S+) = (\(.*?\)|\w+\[[\d,]*\]\S*) (\w[\w-]*)\((.*)", line)
        if not match or match.group(3) in ("parameter", "constant"):
            continue
        name, shape, op, rest = match.groups()
        dims = "" if shape.startswith("(") else shape[shape.index("[") + 1 : shape.index("]")]
        operands = set(re.findall(r"%([\w.\-]+)", rest.split("),")[0]))
        if op == "bitcast":
            if operands & aliases:
                aliases.add(name)
            continue
        reads += bool(operands & aliases)
        size = int(np.prod([int(d) for d in dims.split(",") if d], dtype=int))
        writes += size >= x.size
    return reads, writes


def error_at_large_offset(fn) -> float:
    """Largest relative variance error against float64 at mean / std = 1e4 (float32)."""
    x = np.random.default_rng(0).normal(1e4, 1.0, (256, 8, 8, 4)).astype(np.float32)
    true = np.asarray(x, np.float64).var((0, 1, 2))
    var = np.asarray(jax.jit(fn)(jnp.asarray(x))[1], np.float64)
    return float(np.max(np.abs(var / true - 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--markdown", default=None, help="append a markdown table to this file")
    args = parser.parse_args()
    lines = [
        "## Statistics in one read or two on "
        f"{jax.default_backend()} (time / two passes per round, {args.rounds} "
        "interleaved rounds: median (lowest-highest))",
        "",
        "| shape (NHWC) | form | ms | time / two passes | variance error at mean/std 1e4 "
        "| instructions reading x (a slice of it included) | full-size arrays written |",
        "|---|---|---|---|---|---|---|",
    ]
    errors = {name: error_at_large_offset(fn) for name, fn in FORMS.items()}
    for shape in SHAPES:
        x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
        funcs = {name: timing.jax_callable(jax.jit(fn), x) for name, fn in FORMS.items()}
        samples = timing.interleaved_samples(funcs, rounds=args.rounds)
        base = samples[TWO_PASSES]
        for name, fn in FORMS.items():
            reads, writes = compiled_reads_and_writes(fn, x)
            spread = timing.format_spread(timing.ratio_spread(samples[name], base))
            lines.append(
                f"| {shape} | {name} | {statistics.median(samples[name]):.3f} | {spread} "
                f"| {errors[name]:.1e} | {reads} | {writes} |"
            )
    timing.emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
