"""Tests for jbn.ops.patch_conv against a float64 NumPy convolution and lax.conv_general_dilated."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jbn.models import SmallBNConvNet
from jbn.ops.conv import PatchConv
from jbn.ops.patch_conv import image_patches, patch_conv

KERNEL_SIZES = [(3, 3), (1, 1), (5, 3), (2, 2)]


def _numpy_same_conv(x, kernel):
    """Stride-1 SAME cross-correlation in float64 (XLA's padding split for even sizes)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    kh, kw = kernel.shape[:2]
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            out += padded[:, i : i + h, j : j + w, :] @ kernel[i, j]
    return out


def _lax_conv(x, kernel):
    return lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )


def _inputs(kernel_size, channels=3, features=8, seed=0):
    kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (4, 9, 10, channels))
    kernel = jax.random.normal(kk, (*kernel_size, channels, features))
    g = jax.random.normal(kg, (4, 9, 10, features))
    return x, kernel, g


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES)
def test_forward_matches_float64_reference(kernel_size):
    x, kernel, _ = _inputs(kernel_size)
    np.testing.assert_allclose(
        jax.jit(patch_conv)(x, kernel), _numpy_same_conv(x, kernel), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES)
def test_gradients_match_lax_convolution(kernel_size):
    x, kernel, g = _inputs(kernel_size, seed=1)
    ours = jax.jit(lambda x, k, g: jax.vjp(patch_conv, x, k)[1](g))(x, kernel, g)
    reference = jax.vjp(_lax_conv, x, kernel)[1](g)
    for got, want in zip(ours, reference, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_image_patches_layout():
    """Feature (i * kw + j) * C + c of pixel (h, w) is the input at (h + i - 1, w + j - 1, c)."""
    x = jnp.arange(2 * 4 * 5 * 3, dtype=jnp.float32).reshape(2, 4, 5, 3)
    patches = np.asarray(image_patches(x, (3, 3))).reshape(2, 4, 5, 3, 3, 3)
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(3):
        for j in range(3):
            np.testing.assert_array_equal(patches[:, :, :, i, j], padded[:, i : i + 4, j : j + 5])


@pytest.mark.parametrize("use_bias", [False, True])
def test_module_is_a_drop_in_for_nn_conv(use_bias):
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    ours, theirs = PatchConv(6, (3, 3), use_bias=use_bias), nn.Conv(6, (3, 3), use_bias=use_bias)
    variables = theirs.init(jax.random.key(3), x)
    if use_bias:
        variables = jax.tree.map(lambda v: v + 0.1, variables)  # a non-zero bias
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(3), x)) == jax.tree.map(
        jnp.shape, variables
    )
    np.testing.assert_allclose(
        ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5, atol=1e-5
    )


def test_small_bn_conv_net_same_logits_and_gradients_with_patch_conv():
    images = jax.random.normal(jax.random.key(4), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10
    patch_net, conv_net = SmallBNConvNet(), SmallBNConvNet(patch_conv_channels=0)
    variables = conv_net.init(jax.random.key(5), images, train=False)

    def loss(net, params):
        logits, _ = net.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])

    (ours, our_grads), (theirs, their_grads) = (
        jax.jit(jax.value_and_grad(lambda p, net=net: loss(net, p)))(variables["params"])
        for net in (patch_net, conv_net)
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(our_grads), jax.tree.leaves(their_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bad_input_is_rejected():
    x, kernel, _ = _inputs((3, 3))
    with pytest.raises(ValueError, match="x has 3 channels but the kernel expects 4"):
        patch_conv(x, jnp.zeros((3, 3, 4, 8)))
    with pytest.raises(ValueError, match=r"expected x of shape \(N, H, W, C\)"):
        patch_conv(x[0], kernel)
    with pytest.raises(ValueError, match="padding='SAME' only"):
        PatchConv(4, padding="VALID").init(jax.random.key(0), x)
