"""BatchNorm folding: same eval outputs, per layer and for SmallBNConvNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn.models import SmallBNConvNet
from jbn.tools.folding import fold_into_conv, fold_into_dense, fold_small_bn_convnet

ATOL = 1e-5


def _bn(key, n):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {
        "scale": jax.random.uniform(k1, (n,), minval=0.5, maxval=1.5),
        "bias": jax.random.normal(k2, (n,)),
    }
    stats = {
        "mean": jax.random.normal(k3, (n,)),
        "var": jax.random.uniform(k4, (n,), minval=0.2, maxval=2.0),
    }
    return params, stats


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("affine", [None, "scale", "both"])
def test_fold_into_dense(with_bias, affine):
    kx, kk, kb, kn = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (6, 4))
    kernel = jax.random.normal(kk, (4, 3))
    bias = jax.random.normal(kb, (3,)) if with_bias else None
    params, stats = _bn(kn, 3)
    params = {None: None, "scale": {"scale": params["scale"]}, "both": params}[affine]
    z = x @ kernel + (0 if bias is None else bias)
    expected, _ = jbn.batch_norm(z, params, stats, training=False, epsilon=1e-3)
    k, b = fold_into_dense(kernel, bias, params, stats, epsilon=1e-3)
    np.testing.assert_allclose(x @ k + b, expected, atol=ATOL)


def test_fold_into_conv():
    kx, kk, kn = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 5, 5, 3))
    kernel = jax.random.normal(kk, (3, 3, 3, 4))
    params, stats = _bn(kn, 4)

    def conv(k):
        return jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    expected, _ = jbn.batch_norm(conv(kernel), params, stats, training=False)
    k, b = fold_into_conv(kernel, None, params, stats)
    np.testing.assert_allclose(conv(k) + b, expected, atol=ATOL)


def test_mismatched_stats_raise():
    with pytest.raises(ValueError, match="do not match the 3 output features"):
        fold_into_dense(jnp.ones((2, 3)), None, None, jbn.init_batch_stats(4))


def test_folded_small_bn_convnet_matches_eval_logits():
    model = SmallBNConvNet()
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    variables = model.init(jax.random.key(3), x, train=False)
    # Non-trivial BN parameters and running statistics.
    for i, n in enumerate(model.widths):
        params, stats = _bn(jax.random.key(10 + i), n)
        variables["params"][f"bn{i}"] = params
        variables["batch_stats"][f"bn{i}"] = stats
    expected = model.apply(variables, x, train=False)
    folded = fold_small_bn_convnet(variables, epsilon=model.epsilon)
    baseline = SmallBNConvNet(use_batch_norm=False)
    assert jax.tree.structure(folded) == jax.tree.structure(
        baseline.init(jax.random.key(0), x, train=False)
    )
    np.testing.assert_allclose(baseline.apply(folded, x, train=False), expected, atol=ATOL)
