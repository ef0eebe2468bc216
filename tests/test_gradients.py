"""Derivatives of the functional core against plain JAX autodiff in float64.

The custom derivative's gradients, Hessians and JVPs are compared with
autodiff through a plain two-pass BatchNorm (``bn_reference.plain_batch_norm``),
and masked gradients and Hessians with autodiff through the masked definition
written out. Tolerances: 1e-10 for gradients and JVPs, 1e-9 for Hessians
(1e-8 relative with a mask).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bn_reference import EPS, plain_batch_norm

import jbn


def _loss_pair(red, mask=None):
    def ours(x, g, b):
        y, _ = jbn.batch_norm(
            x,
            {"scale": g, "bias": b},
            jbn.init_batch_stats(g.shape, jnp.float64),
            training=True,
            mask=mask,
        )
        return y

    def ref(x, g, b):
        return plain_batch_norm(x, g, b, red)

    return ours, ref


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 3, 2)])
def test_first_and_second_derivatives_match_plain_autodiff_float64(shape):
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        x = jnp.asarray(rng.normal(1.0, 2.0, shape))
        g = jnp.asarray(rng.normal(size=shape[-1:]))
        b = jnp.asarray(rng.normal(size=shape[-1:]))
        w = jnp.asarray(rng.normal(size=shape))
        red = tuple(range(len(shape) - 1))
        ours, ref = _loss_pair(red)

        def scalar(f):
            return lambda x, g, b: jnp.sum(jnp.sin(f(x, g, b)) * w)

        # Jitted: one compile per derivative instead of one per primitive.
        for a, r in zip(
            jax.jit(jax.grad(scalar(ours), (0, 1, 2)))(x, g, b),
            jax.jit(jax.grad(scalar(ref), (0, 1, 2)))(x, g, b),
            strict=True,
        ):
            np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-10)
        for argnum in (0, 1):
            h = jax.jit(jax.hessian(scalar(ours), argnum))(x, g, b)
            h_ref = jax.jit(jax.hessian(scalar(ref), argnum))(x, g, b)
            np.testing.assert_allclose(h, h_ref, rtol=1e-9, atol=1e-9)
        t = jnp.asarray(rng.normal(size=shape))
        np.testing.assert_allclose(
            jax.jit(lambda x, t: jax.jvp(lambda x: ours(x, g, b), (x,), (t,))[1])(x, t),
            jax.jit(lambda x, t: jax.jvp(lambda x: ref(x, g, b), (x,), (t,))[1])(x, t),
            rtol=1e-10,
            atol=1e-10,
        )


def test_masked_gradients_match_autodiff_on_the_valid_subset_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        x = jnp.asarray(rng.normal(size=(10, 3)))
        mask = jnp.asarray(rng.random((10, 1)) > 0.4)
        g, b = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.1, 0.0, -0.3])

        def ours(x):
            y, _ = jbn.batch_norm(
                x, {"scale": g, "bias": b}, jbn.init_batch_stats(3), training=True, mask=mask
            )
            return jnp.sum(jnp.where(mask, jnp.sin(y), 0.0))

        def ref(x):
            m = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
            n = m.sum(0, keepdims=True)
            mean = (m * x).sum(0, keepdims=True) / n
            var = (m * (x - mean) ** 2).sum(0, keepdims=True) / n
            y = (x - mean) / jnp.sqrt(var + EPS) * g[None] + b[None]
            return jnp.sum(jnp.where(mask, jnp.sin(y), 0.0))

        grad, hessian = jax.jit(jax.grad(ours)), jax.jit(jax.hessian(ours))
        np.testing.assert_allclose(grad(x), jax.jit(jax.grad(ref))(x), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(hessian(x), jax.jit(jax.hessian(ref))(x), rtol=1e-8, atol=1e-10)
