"""Tests for jbn.ops.pooling.max_pool against flax.linen.max_pool (reduce_window)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbn.ops.pooling import max_pool


def _reference(x, k):
    return nn.max_pool(x, (k, k), strides=(k, k), padding="VALID")


def _grads(pool, x, k, g):
    return jax.vjp(lambda v: pool(v, k), x)[1](g)[0]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_forward_matches_reduce_window(k):
    x = jax.random.normal(jax.random.key(0), (3, 12, 12, 5))
    np.testing.assert_array_equal(max_pool(x, k), _reference(x, k))


@pytest.mark.parametrize("k", [2, 3])
def test_gradient_matches_random_inputs(k):
    kx, kg = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, 6, 12, 4))
    g = jax.random.normal(kg, (2, 6 // k, 12 // k, 4))
    np.testing.assert_array_equal(_grads(max_pool, x, k, g), _grads(_reference, x, k, g))


@pytest.mark.parametrize("k", [2, 3])
def test_gradient_matches_with_ties(k):
    """Ties go to the first maximum in row-major order, like select_and_scatter."""
    kx, kg = jax.random.split(jax.random.key(2))
    x = jax.random.bernoulli(kx, 0.3, (4, 6, 6, 3)).astype(jnp.float32)
    x = x.at[0].set(0.0)  # Whole windows of zeros: all elements tie.
    g = jax.random.normal(kg, (4, 6 // k, 6 // k, 3))
    ours = _grads(max_pool, x, k, g)
    np.testing.assert_array_equal(ours, _grads(_reference, x, k, g))
    # Exactly one element per window receives the cotangent.
    counts = (ours != 0).reshape(4, 6 // k, k, 6 // k, k, 3).sum(axis=(2, 4))
    np.testing.assert_array_equal(counts, 1)


def test_gradient_differs_from_plain_jnp_max_on_ties():
    x = jnp.zeros((1, 2, 2, 1))
    plain = jax.grad(lambda v: jnp.max(v))(x)
    ours = jax.grad(lambda v: max_pool(v, 2).sum())(x)
    assert float(plain[0, 0, 0, 0]) == 0.25
    np.testing.assert_array_equal(ours[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_jit_and_dtype():
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    y = jax.jit(max_pool, static_argnums=1)(x, 2)
    assert y.shape == (2, 4, 4, 3) and y.dtype == x.dtype
    assert max_pool(x.astype(jnp.bfloat16), 2).dtype == jnp.bfloat16


def test_extra_leading_dims():
    x = jax.random.normal(jax.random.key(4), (2, 3, 4, 4, 2))
    np.testing.assert_array_equal(max_pool(x, 2)[1], _reference(x[1], 2))


@pytest.mark.parametrize("shape", [(1, 5, 4, 1), (1, 4, 7, 1)])
def test_odd_spatial_size_raises(shape):
    with pytest.raises(ValueError, match="not divisible by window 2"):
        max_pool(jnp.zeros(shape), 2)


@pytest.mark.parametrize("window", [0, -1, 2.0])
def test_bad_window_raises(window):
    with pytest.raises(ValueError, match="window must be a positive int"):
        max_pool(jnp.zeros((1, 4, 4, 1)), window)
