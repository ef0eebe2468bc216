"""PreciseBN recalibration: exact count-weighted population statistics, weights untouched."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn import models
from jbn.models import SmallBNConvNet
from jbn.tools.recalibration import batch_norm_moments, recalibrate_batch_stats

MODEL = SmallBNConvNet(widths=(4, 8))


def _setup():
    keys = jax.random.split(jax.random.key(0), 4)
    # Different sizes and distributions: count weighting and the between-batch term matter.
    batches = [
        jax.random.normal(keys[0], (4, 8, 8, 3)),
        jax.random.normal(keys[1], (2, 8, 8, 3)) * 2 + 1,
        jax.random.normal(keys[2], (4, 8, 8, 3)) - 0.5,
    ]
    variables = MODEL.init(keys[3], batches[0], train=False)
    return variables, batches


def _apply_train(variables, x):
    return MODEL.apply(variables, x, train=True, mutable=["batch_stats"])


def _conv0(variables, x):
    kernel = np.asarray(variables["params"]["conv0"]["kernel"], np.float64)
    return np.asarray(
        jax.lax.conv_general_dilated(
            np.asarray(x, np.float64),
            kernel,
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision="highest",
        )
    )


@pytest.mark.parametrize("variance", ["population", "batch_average"])
def test_first_layer_stats_are_the_hand_computed_average(variance):
    variables, batches = _setup()
    new = recalibrate_batch_stats(_apply_train, variables, batches, variance=variance)
    outs = [_conv0(variables, x).reshape(-1, 4) for x in batches]
    if variance == "population":
        pooled = np.concatenate(outs)
        mean, var = pooled.mean(0), pooled.var(0)
    else:
        counts = np.array([len(o) for o in outs], np.float64)[:, None]
        mean = (counts * np.stack([o.mean(0) for o in outs])).sum(0) / counts.sum()
        var = (counts * np.stack([o.var(0) for o in outs])).sum(0) / counts.sum()
    np.testing.assert_allclose(new["batch_stats"]["bn0"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["bn0"]["var"], var, rtol=1e-5, atol=1e-6)
    # The weights are untouched (bitwise) and eval logits follow the new statistics.
    jax.tree.map(np.testing.assert_array_equal, new["params"], variables["params"])
    x = batches[0]
    assert not np.allclose(MODEL.apply(new, x, train=False), MODEL.apply(variables, x, train=False))


def test_second_layer_uses_train_mode_activations():
    variables, batches = _setup()
    new = recalibrate_batch_stats(_apply_train, variables, batches)
    # Hand computation: capture conv1's outputs in training mode (bn0 on batch stats).
    outs = []
    for x in batches:
        _, state = MODEL.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda m, _: m.name == "conv1",
        )
        outs.append(np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64))
    pooled = np.concatenate([o.reshape(-1, 8) for o in outs])
    np.testing.assert_allclose(
        new["batch_stats"]["bn1"]["mean"], pooled.mean(0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        new["batch_stats"]["bn1"]["var"], pooled.var(0), rtol=1e-5, atol=1e-5
    )
    # Eval logits are those of the model with these statistics.
    logits = MODEL.apply(new, batches[0], train=False)
    stats = {
        "bn0": new["batch_stats"]["bn0"],
        "bn1": {"mean": pooled.mean(0), "var": pooled.var(0)},
    }
    expected = MODEL.apply(
        {"params": variables["params"], "batch_stats": stats}, batches[0], train=False
    )
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_equal_batches_give_batch_statistics_and_unbiased_flag_is_honoured():
    x = jax.random.normal(jax.random.key(1), (5, 3)) * 3 + 2
    for unbiased in (False, True):
        module = jbn.BatchNorm(use_running_average=False, unbiased_running_var=unbiased)
        variables = module.init(jax.random.key(0), x)
        apply_fn = lambda v, b, m=module: m.apply(v, b, mutable=["batch_stats"])  # noqa: E731
        new = recalibrate_batch_stats(apply_fn, variables, [x, x])
        # The pooled data is x twice: N = 10, so the unbiased variance is 10/9 * var.
        factor = 10 / 9 if unbiased else 1.0
        np.testing.assert_allclose(new["batch_stats"]["mean"], np.mean(x, 0), rtol=1e-6)
        np.testing.assert_allclose(new["batch_stats"]["var"], factor * np.var(x, 0), rtol=1e-5)


def test_flax_batch_norm_and_masks_are_supported():
    x = jax.random.normal(jax.random.key(2), (6, 2))
    mask = jnp.arange(6)[:, None] < 4
    module = nn.BatchNorm(use_running_average=False)
    variables = module.init(jax.random.key(0), x)
    apply_fn = lambda v, b: module.apply(v, b[0], mask=b[1], mutable=["batch_stats"])  # noqa: E731
    new = recalibrate_batch_stats(apply_fn, variables, [(x, mask)])
    np.testing.assert_allclose(new["batch_stats"]["mean"], np.mean(x[:4], 0), rtol=1e-6)
    moments = batch_norm_moments(apply_fn, variables, (x, mask))
    assert list(moments) == [()]


def test_errors():
    variables, batches = _setup()
    with pytest.raises(ValueError, match="nothing to recalibrate"):
        recalibrate_batch_stats(_apply_train, variables, [])
    with pytest.raises(ValueError, match="variance must be"):
        recalibrate_batch_stats(_apply_train, variables, batches, variance="ema")

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            bn = jbn.BatchNorm(use_running_average=False)
            return bn(bn(x))

    x = jnp.ones((4, 2))
    v = Twice().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="called more than once"):
        recalibrate_batch_stats(functools.partial(Twice().apply, mutable=["batch_stats"]), v, [x])


def test_recalibrating_a_resnet_from_one_batch_gives_its_batch_statistics():
    # PreciseBN over one batch: each layer's moments in a train-mode pass, which a
    # BatchNorm with momentum 0 stores as its running statistics in that same pass.
    model = models.resnet_cifar(
        8, shortcut="B", norm=functools.partial(jbn.BatchNorm, momentum=0.0)
    )
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3)) * 2 + 0.5
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), x)

    def apply_fn(variables, batch):
        return model.apply(variables, batch, train=True, mutable=["batch_stats"])

    new = recalibrate_batch_stats(apply_fn, variables, [x])
    _, expected = jax.jit(apply_fn)(variables, x)
    assert jax.tree.structure(new["batch_stats"]) == jax.tree.structure(expected["batch_stats"])
    # Nine layers (the stem, two per block, two projections), with a mean and a var each.
    assert len(jax.tree.leaves(new["batch_stats"])) == 2 * 9
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
        new["batch_stats"],
        expected["batch_stats"],
    )
    assert not np.allclose(new["batch_stats"]["layer3_0"]["bn1"]["var"], 1.0)
    jax.tree.map(np.testing.assert_array_equal, new["params"], variables["params"])
