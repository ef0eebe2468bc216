"""Tests for jbn.models.SmallBNConvNet."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jbn
from jbn.models import SmallBNConvNet, make_model


def _shapes(tree):
    return jax.tree.map(lambda a: a.shape, tree)


def _init(model, batch=2):
    init = jax.jit(functools.partial(model.init, train=False))
    return init(jax.random.key(0), jnp.zeros((batch, 32, 32, 3)))


def test_variable_tree_matches_seed_network():
    variables = _init(SmallBNConvNet())
    assert _shapes(variables) == {
        "params": {
            "conv0": {"kernel": (3, 3, 3, 16)},
            "bn0": {"scale": (16,), "bias": (16,)},
            "conv1": {"kernel": (3, 3, 16, 32)},
            "bn1": {"scale": (32,), "bias": (32,)},
            "head": {"kernel": (32 * 8 * 8, 10), "bias": (10,)},
        },
        "batch_stats": {
            "bn0": {"mean": (16,), "var": (16,)},
            "bn1": {"mean": (32,), "var": (32,)},
        },
    }


def test_output_shape_and_widths():
    model = SmallBNConvNet(num_classes=7, widths=(8, 8, 4))
    variables = _init(model)
    assert variables["params"]["head"]["kernel"].shape == (4 * 4 * 4, 7)
    logits = model.apply(variables, jnp.ones((3, 32, 32, 3)), train=False)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32


def test_no_bn_baseline_has_conv_bias_and_no_batch_stats():
    variables = _init(SmallBNConvNet(use_batch_norm=False))
    assert set(variables) == {"params"}
    assert _shapes(variables["params"]["conv0"]) == {"kernel": (3, 3, 3, 16), "bias": (16,)}
    assert "bn0" not in variables["params"]


def test_train_mode_updates_batch_stats_with_momentum():
    model = SmallBNConvNet(momentum=0.9)
    variables = _init(model, batch=4)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 3.0 + 1.0
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    feats = jax.lax.conv_general_dilated(
        x,
        variables["params"]["conv0"]["kernel"],
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    expected = 0.1 * feats.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(updates["batch_stats"]["bn0"]["mean"], expected, atol=1e-5)


def test_eval_mode_uses_the_running_stats_only():
    model = SmallBNConvNet()
    variables = _init(model, batch=4)
    rng = np.random.default_rng(0)
    variables["batch_stats"] = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), variables["batch_stats"]
    )
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    logits, updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    # Each example's logits do not depend on the rest of the batch (in training they do).
    alone = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(alone, logits[:1], rtol=1e-6, atol=1e-6)
    trained = [
        model.apply(variables, b, train=True, mutable=["batch_stats"])[0] for b in (x, x[:1])
    ]
    assert np.abs(trained[0][:1] - trained[1]).max() > 1e-2


def test_flax_norm_gives_same_function():
    """jbn.BatchNorm is a drop-in: same variables give the same logits as nn.BatchNorm."""
    ours = SmallBNConvNet()
    theirs = SmallBNConvNet(
        norm=functools.partial(nn.BatchNorm, momentum=0.9),
        pool=lambda x, k: nn.max_pool(x, (k, k), strides=(k, k), padding="VALID"),
    )
    variables = _init(ours, batch=8)
    x = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
    (a, sa), (b, sb) = (
        m.apply(variables, x, train=True, mutable=["batch_stats"]) for m in (ours, theirs)
    )
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), sa, sb)


def test_make_model_from_config():
    cfg = ml_collections.ConfigDict(
        dict(
            name="SmallBNConvNet",
            num_classes=10,
            widths=(16, 32),
            use_batch_norm=True,
            bn_momentum=0.9,
            bn_epsilon=1e-5,
            virtual_batch_size=None,
        )
    )
    assert make_model(cfg) == SmallBNConvNet()
    cfg.name = "ResNet"
    with pytest.raises(ValueError, match="Unknown model 'ResNet'"):
        make_model(cfg)


def test_fast_network_equals_the_seed_ordering_with_reduce_window_pooling():
    """relu(max_pool(x)) with jbn's pool == max_pool(relu(x)) with nn.max_pool, value and grads."""

    class SeedOrder(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            for i, width in enumerate((16, 32)):
                x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False, name=f"conv{i}")(x)
                x = jbn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
                x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
            return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))

    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    variables = SmallBNConvNet().init(jax.random.key(1), x, train=False)

    def loss(params, model):
        logits, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(logits))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value, grads = value_and_grad(variables["params"], SmallBNConvNet())
    ref_value, ref_grads = value_and_grad(variables["params"], SeedOrder())
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    # On the CPU the largest difference was 7e-7 of a leaf's largest entry. Off
    # the CPU, kernel gradients (sums of 8192 products with cancelling signs)
    # follow the convolution algorithm's rounding: on an H100, PatchConv vs cuDNN
    # differed by 5e-5 on a leaf whose largest entry is 5.3.
    on_cpu = jax.default_backend() == "cpu"
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-5 if on_cpu else 1e-4 * np.abs(b).max()
        ),
        grads,
        ref_grads,
    )
