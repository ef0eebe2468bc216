"""The functional core under jit, vmap, scan, checkpoint and vmap's axis_name.

Forward outputs and running statistics under each transformation equal a plain
Python loop (1e-6); gradients under each equal float64 plain autodiff of the
untransformed computation (``bn_reference.plain_batch_norm``; 1e-5 in float32,
1e-10 in float64, relative to the largest gradient); ``axis_name`` under vmap
equals BatchNorm over the global batch (1e-5, running variance 1e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bn_reference import plain_batch_norm

import jbn


def test_forward_under_jit_vmap_scan_checkpoint():
    rng = np.random.default_rng(13)
    xs = jnp.asarray(rng.normal(size=(3, 8, 4)).astype(np.float32))
    params, stats = jbn.init_params(4), jbn.init_batch_stats(4)

    def step(stats, x):
        y, stats = jbn.batch_norm(x, params, stats, training=True, momentum=0.5)
        return stats, y

    final, ys = jax.lax.scan(jax.checkpoint(step), stats, xs)
    s, y_loop = stats, []
    for x in xs:
        s, y = step(s, x)
        y_loop.append(y)
    np.testing.assert_allclose(ys, np.stack(y_loop), atol=1e-6)
    np.testing.assert_allclose(final["var"], s["var"], rtol=1e-6)
    y_vmap, _ = jax.vmap(lambda x: jbn.batch_norm(x, params, stats, training=True))(xs)
    np.testing.assert_allclose(y_vmap, np.stack(y_loop), atol=1e-6)
    y_jit, _ = jax.jit(lambda x: jbn.batch_norm(x, params, stats, training=True))(xs[0])
    np.testing.assert_allclose(y_jit, y_loop[0], atol=1e-6)
    # Gradients under each: test_gradients_under_transformations_match_float64_plain_autodiff.


def _transformed_losses(batch_norm):
    """Losses of (xs, scale, bias), one per transformation, all built on ``batch_norm``."""

    def bn(x, g, b):
        return batch_norm(x, g, b)

    def single(x, g, b, w):
        return jnp.sum(jnp.sin(bn(x, g, b)) * w)

    def recurrent(xs, g, b, ws):  # BatchNorm applied to its own output, step after step
        def step(h, xw):
            x, w = xw
            h = jnp.tanh(bn(h + x, g, b))
            return h, jnp.sum(h * w)

        return jnp.sum(jax.lax.scan(step, jnp.zeros_like(xs[0]), (xs, ws))[1])

    def looped(xs, g, b, ws):  # the same recurrence, unrolled in Python
        h, total = jnp.zeros_like(xs[0]), 0.0
        for x, w in zip(xs, ws, strict=True):
            h = jnp.tanh(bn(h + x, g, b))
            total = total + jnp.sum(h * w)
        return total

    return {
        "jit": (jax.jit(single), single),
        "checkpoint": (  # Only the BatchNorm call rematerialized.
            lambda x, g, b, w: jnp.sum(jnp.sin(jax.checkpoint(bn)(x, g, b)) * w),
            single,
        ),
        "remat": (jax.checkpoint(single), single),
        "vmap": (
            lambda xs, g, b, ws: jnp.sum(jax.vmap(single, (0, None, None, 0))(xs, g, b, ws)),
            lambda xs, g, b, ws: sum(single(x, g, b, w) for x, w in zip(xs, ws, strict=True)),
        ),
        "scan": (recurrent, looped),
    }


@pytest.mark.parametrize("transform", ["jit", "checkpoint", "remat", "vmap", "scan"])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
def test_gradients_under_transformations_match_float64_plain_autodiff(transform, dtype, tol):
    rng = np.random.default_rng(17)
    stacked = transform in ("vmap", "scan")
    shape = (3, 8, 4) if stacked else (8, 4)
    x, w = rng.normal(1.0, 2.0, shape), rng.normal(size=shape)
    g, b = rng.normal(size=4), rng.normal(size=4)

    def ours(x, g, b):
        params = {"scale": g, "bias": b}
        return jbn.batch_norm(x, params, jbn.init_batch_stats(4, x.dtype), training=True)[0]

    def ref(x, g, b):
        return plain_batch_norm(x, g, b, (0,))

    with jax.enable_x64(True):
        transformed, _ = _transformed_losses(ours)[transform]
        _, untransformed = _transformed_losses(ref)[transform]
        args = [jnp.asarray(a, dtype) for a in (x, g, b, w)]
        grads = jax.jit(jax.grad(transformed, (0, 1, 2)))(*args)
        grads_ref = jax.jit(jax.grad(untransformed, (0, 1, 2)))(
            *[jnp.asarray(a, np.float64) for a in (x, g, b, w)]
        )
        for got, want in zip(grads, grads_ref, strict=True):
            assert got.dtype == dtype
            scale = float(jnp.max(jnp.abs(want)))
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def test_vmap_axis_name_equals_the_global_batch():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(4, 6, 3)).astype(np.float32)
    mask = rng.random((4, 6, 1)) > 0.3
    params, stats = jbn.init_params(3), jbn.init_batch_stats(3)
    y, new = jax.vmap(
        lambda x, m: jbn.batch_norm(x, params, stats, training=True, axis_name="batch", mask=m),
        axis_name="batch",
    )(x, mask)
    y_ref, new_ref = jbn.batch_norm(
        x.reshape(24, 3), params, stats, training=True, mask=mask.reshape(24, 1)
    )
    np.testing.assert_allclose(y.reshape(24, 3), y_ref, atol=1e-5)
    np.testing.assert_allclose(new["var"][0], new_ref["var"], rtol=1e-6)
