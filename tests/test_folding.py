"""BatchNorm folding: same eval outputs, per layer, for SmallBNConvNet and the ResNets."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn import cpu_tuning, models
from jbn.models import SmallBNConvNet
from jbn.tools.folding import (
    fold_batch_norm,
    fold_into_conv,
    fold_into_dense,
    fold_small_bn_convnet,
)

ATOL = 1e-5
INIT_OPTIONS = cpu_tuning.init_compiler_options(jax.default_backend())


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


def _randomize_batch_norms(variables, seed=20):
    """Non-trivial scale, bias and running statistics for every BatchNorm layer."""
    params, stats = (jax.tree.map(lambda a: a, variables[c]) for c in ("params", "batch_stats"))

    def visit(layer_params, layer_stats, key):
        if "mean" in layer_stats:
            bn_params, bn_stats = _bn(key, layer_stats["mean"].size)
            layer_params.update(bn_params)
            layer_stats.update(bn_stats)
            return
        for i, name in enumerate(sorted(layer_stats)):
            visit(layer_params[name], layer_stats[name], jax.random.fold_in(key, i))

    visit(params, stats, jax.random.key(seed))
    return {"params": params, "batch_stats": stats}


def _small_bottleneck_resnet(**kwargs):
    return models.ResNet(
        stage_sizes=(1, 1), block="bottleneck", widths=(8, 16), num_classes=10, **kwargs
    )


@pytest.mark.parametrize(
    "make, hw",
    [
        (lambda **kw: models.resnet20(shortcut="B", **kw), 32),  # Projections fold too.
        (_small_bottleneck_resnet, 32),  # Bottleneck blocks, 7x7 stem and max pooling.
        (lambda **kw: SmallBNConvNet(widths=(4, 8), **kw), 16),  # PatchConv input layer.
    ],
)
def test_fold_batch_norm_matches_eval_logits(make, hw):
    model, baseline = make(), make(use_batch_norm=False)
    x = jax.random.normal(jax.random.key(2), (2, hw, hw, 3))
    init = jax.jit(functools.partial(model.init, train=False), compiler_options=INIT_OPTIONS)
    variables = _randomize_batch_norms(init(jax.random.key(3), x))
    expected = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    folded = fold_batch_norm(lambda v, x: model.apply(v, x, train=False), variables, x)
    template = jax.eval_shape(functools.partial(baseline.init, train=False), jax.random.key(0), x)
    assert jax.tree.structure(folded) == jax.tree.structure(template)
    ours = jax.jit(functools.partial(baseline.apply, train=False))(folded, x)
    # Within 1e-5 of the largest logit.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert not np.allclose(expected, 0.0, atol=1e-3)


class _ConvBN(nn.Module):
    foldable: bool = True

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = jbn.BatchNorm(use_running_average=not train, epsilon=0.5)(x)
        if not self.foldable:  # A second norm layer after a ReLU: nothing to fold it into.
            x = jbn.BatchNorm(use_running_average=not train)(nn.relu(x))
        return x


def test_fold_batch_norm_uses_each_layers_epsilon():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    model = _ConvBN()
    variables = _randomize_batch_norms(model.init(jax.random.key(1), x, train=False))
    folded = fold_batch_norm(lambda v, x: model.apply(v, x, train=False), variables, x)
    conv = folded["params"]["Conv_0"]
    ours = nn.Conv(4, (3, 3)).apply({"params": conv}, x)
    np.testing.assert_allclose(ours, model.apply(variables, x, train=False), atol=ATOL)


def test_fold_batch_norm_refuses_a_norm_that_follows_no_kernel():
    x = jnp.ones((1, 4, 4, 3))
    model = _ConvBN(foldable=False)
    variables = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="norm layer BatchNorm_1 does not directly follow"):
        fold_batch_norm(lambda v, x: model.apply(v, x, train=False), variables, x)


class _Reused(nn.Module):
    """Conv -> BN, with the conv's output also read elsewhere (a sum, a layer, the output)."""

    reader: str

    @nn.compact
    def __call__(self, x, train):
        z = nn.Conv(4, (3, 3))(x)
        y = jbn.BatchNorm(use_running_average=not train)(z)
        if self.reader == "sum":
            return y + z
        if self.reader == "layer":
            return y + nn.Conv(4, (1, 1))(z)
        return y, z


@pytest.mark.parametrize("reader", ["sum", "layer", "output"])
def test_fold_batch_norm_refuses_a_layer_whose_output_is_read_elsewhere(reader):
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    model = _Reused(reader)
    variables = _randomize_batch_norms(model.init(jax.random.key(1), x, train=False))
    with pytest.raises(
        ValueError,
        match=r"the output of layer Conv_0 feeds norm layer BatchNorm_0 and is also read "
        r"elsewhere \((add|conv_general_dilated|returned)\)",
    ):
        fold_batch_norm(lambda v, x: model.apply(v, x, train=False), variables, x)
