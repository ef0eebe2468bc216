"""How many input-sized arrays BatchNorm writes and saves for the backward pass.

On XLA:CPU, the compiled forward and forward+backward each write exactly one
full-size array (x - mean is never written to memory), counted in the compiled
HLO (``compiled_hlo.full_size_fusions``); the vjp saves exactly one full-size
residual, the input in its own dtype, plus the boolean mask when there is one,
counted from ``jax.ad_checkpoint.print_saved_residuals``. Exact counts, no
tolerance.
"""

import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from compiled_hlo import full_size_fusions

import jbn


@pytest.mark.parametrize(
    "shape,kwargs",
    [
        ((64, 8, 8, 32), dict()),
        ((64, 32, 8, 8), dict(axis=1)),
        ((4096, 32), dict()),
        ((64, 8, 8, 32), dict(virtual_batch_size=16)),
    ],
)
def test_x_minus_mean_is_never_written_to_memory(shape, kwargs):
    # On XLA:CPU the statistics and the gradient's sums read x with x - mean
    # fused in: forward and forward+backward each write one full-size array,
    # their result (y, dx). When XLA's CSE merges two of the x - mean (or their
    # broadcast means), it writes that array to memory and reads it back (so
    # did the code before it wrote them apart, for all but NHWC). With a mask,
    # XLA:CPU writes the masked arrays (YNNPACK's reductions take no select).
    if jax.default_backend() != "cpu":
        pytest.skip("checks XLA:CPU's fusions")
    axis = kwargs.get("axis", -1)
    x = jnp.asarray(np.random.default_rng(17).normal(size=shape), jnp.float32)
    params, stats = jbn.init_params(shape[axis]), jbn.init_batch_stats(shape[axis])

    def forward(x, params):
        return jbn.batch_norm(x, params, stats, training=True, **kwargs)

    def forward_backward(x, params, dy):
        (y, new_stats), vjp = jax.vjp(forward, x, params)
        return vjp((dy, jax.tree.map(jnp.zeros_like, new_stats)))

    assert len(full_size_fusions(forward, x, params, size=x.size)) == 1
    assert len(full_size_fusions(forward_backward, x, params, x, size=x.size)) == 1


def _full_size_residuals(f, x, *args):
    """(dtype, shape) of every residual of ``jax.vjp(f)`` with as many elements as ``x``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, x, *args)
    found = []
    for line in out.getvalue().splitlines():
        dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
        shape = tuple(int(d) for d in dims.split(",") if d)
        if np.prod(shape, dtype=int) >= x.size:  # any shape: reshaped copies count too
            found.append((dtype, shape))
    return found, out.getvalue()


@pytest.mark.parametrize(
    "shape,kwargs,dtype",
    [
        ((8, 6, 6, 4), dict(axis=-1), jnp.float32),
        ((8, 4, 6, 6), dict(axis=1), jnp.float32),
        ((8, 6, 6, 4), dict(virtual_batch_size=4), jnp.float32),
        ((8, 6, 6, 4), dict(), jnp.bfloat16),
    ],
)
def test_saves_one_full_size_residual_its_input(shape, kwargs, dtype):
    x = jnp.asarray(np.random.default_rng(15).normal(size=shape), dtype)
    axis = kwargs.get("axis", -1)

    def f(x, params):
        return jbn.batch_norm(
            x, params, jbn.init_batch_stats(x.shape[axis]), training=True, **kwargs
        )

    found, text = _full_size_residuals(f, x, jbn.init_params(shape[axis]))
    # One full-size array, x itself (in the input dtype), before and after any reshape.
    assert [dtype for dtype, _ in found] == [{jnp.float32: "f32", jnp.bfloat16: "bf16"}[dtype]], (
        text
    )


def test_with_a_mask_the_residuals_are_the_input_and_the_boolean_mask():
    rng = np.random.default_rng(16)
    x = jnp.asarray(rng.normal(size=(8, 6, 6, 4)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 6, 6, 1)) > 0.3)

    def f(x, params):
        return jbn.batch_norm(x, params, jbn.init_batch_stats(4), training=True, mask=mask)

    found, text = _full_size_residuals(f, x, jbn.init_params(4))
    assert sorted(found) == [("bool", x.shape), ("f32", x.shape)], text
