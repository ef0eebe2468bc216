"""Tests for jbn.models.MLP (the BatchNorm paper's Figure 1 network) against float64 NumPy."""

import jax
import ml_collections
import numpy as np
import pytest

from jbn.models import MLP, make_model
from jbn.models.mlp import pre_activation_name


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _reference(variables, x, use_bn, train, widths):
    """Float64 forward pass from the variables: Dense -> [BN] -> sigmoid per layer, then head."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    stats = jax.tree.map(lambda a: np.asarray(a, np.float64), variables.get("batch_stats", {}))
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    pre_activations = []
    for i in range(len(widths)):
        dense = params[f"dense{i}"]
        h = h @ dense["kernel"] + (0 if use_bn else dense["bias"])
        if use_bn:
            bn = params[f"bn{i}"]
            if train:
                mean, var = h.mean(0), h.var(0)
            else:
                mean, var = stats[f"bn{i}"]["mean"], stats[f"bn{i}"]["var"]
            h = (h - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
        pre_activations.append(h)
        h = _sigmoid(h)
    head = params["head"]
    return h @ head["kernel"] + head["bias"], pre_activations


@pytest.mark.parametrize("use_bn", [True, False])
def test_layer_sizes_and_where_batch_norm_sits(use_bn):
    model = MLP(widths=(100, 100, 100), use_batch_norm=use_bn)
    x = jax.random.normal(jax.random.key(0), (6, 32, 32, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    shapes = jax.tree.map(lambda a: a.shape, variables["params"])
    expected = {"head": {"kernel": (100, 10), "bias": (10,)}}
    for i, fan_in in enumerate((32 * 32 * 3, 100, 100)):
        # Hidden Dense layers have a bias only without BN (BN's bias replaces it).
        expected[f"dense{i}"] = {"kernel": (fan_in, 100), **({} if use_bn else {"bias": (100,)})}
        if use_bn:
            expected[f"bn{i}"] = {"scale": (100,), "bias": (100,)}
    assert shapes == expected
    assert ("batch_stats" in variables) == use_bn

    # BN sits between each Dense and its sigmoid: the forward pass and the sown
    # sigmoid inputs match a float64 NumPy network built that way, in both modes.
    if use_bn:  # Non-trivial running statistics and affine parameters.
        keys = iter(jax.random.split(jax.random.key(2), 16))
        variables = jax.tree.map(
            lambda a: a + 0.3 * jax.random.uniform(next(keys), a.shape) if a.ndim == 1 else a,
            variables,
        )
    for train in (True, False):
        logits, sown = model.apply(
            variables, x, train=train, mutable=["intermediates", "batch_stats"]
        )
        ref_logits, ref_pre = _reference(variables, x, use_bn, train, (100, 100, 100))
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
        for layer in (1, 2, 3):
            value = sown["intermediates"][pre_activation_name(layer)][0]
            np.testing.assert_allclose(value, ref_pre[layer - 1], rtol=1e-4, atol=1e-4)


def test_registry_builds_it_and_bad_activation_is_named():
    cfg = ml_collections.ConfigDict(
        dict(
            name="mlp",
            num_classes=7,
            widths=[20, 30],
            activation="tanh",
            use_batch_norm=False,
            bn_momentum=0.9,
            bn_epsilon=1e-5,
            virtual_batch_size=None,
        )
    )
    expected = MLP(num_classes=7, widths=(20, 30), activation="tanh", use_batch_norm=False)
    assert make_model(cfg) == expected
    del cfg["activation"]  # Absent: the model's default, the paper's sigmoid.
    assert make_model(cfg).activation == "sigmoid"
    with pytest.raises(ValueError, match="Unknown activation 'swish'"):
        MLP(activation="swish").init(jax.random.key(0), np.zeros((1, 4)), train=False)
