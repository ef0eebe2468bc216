"""Frozen BatchNorm fine-tuning: stats bitwise unchanged; scale/bias train unless masked."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jbn.models import SmallBNConvNet
from jbn.tools.freezing import batch_norm_param_mask, freeze_batch_norm_params, frozen_batch_norm


def _data():
    kx, ky = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, (8, 8, 8, 3)), jax.random.randint(ky, (8,), 0, 10)


def _fine_tune(model, variables, tx, steps=2):
    x, y = _data()
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt_state):
        def loss_fn(params):
            logits, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates

        (_, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        deltas, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], deltas)
        return {**variables, "params": params, **updates}, opt_state

    for _ in range(steps):
        variables, opt_state = step(variables, opt_state)
    return variables


def _pretrained(model):
    x, _ = _data()
    variables = model.init(jax.random.key(1), x, train=False)
    # Non-trivial running statistics, as after pre-training.
    _, updates = SmallBNConvNet(widths=(4, 8)).apply(
        variables, x * 2 + 1, train=True, mutable=["batch_stats"]
    )
    return {**variables, **updates}


@pytest.mark.parametrize("norm", [None, nn.BatchNorm])
def test_frozen_stats_do_not_move_but_scale_and_bias_train(norm):
    kwargs = {} if norm is None else {"norm": norm}
    model = SmallBNConvNet(widths=(4, 8), norm=frozen_batch_norm(**kwargs, momentum=0.9))
    variables = _pretrained(model)
    tuned = _fine_tune(model, variables, optax.sgd(0.1))
    jax.tree.map(np.testing.assert_array_equal, tuned["batch_stats"], variables["batch_stats"])
    for name in ("bn0", "bn1"):
        for key in ("scale", "bias"):
            assert not np.array_equal(tuned["params"][name][key], variables["params"][name][key])


def test_param_mask_freezes_scale_and_bias_too():
    model = SmallBNConvNet(widths=(4, 8), norm=frozen_batch_norm(momentum=0.9))
    variables = _pretrained(model)
    mask = batch_norm_param_mask(variables)
    assert mask["bn0"] == {"scale": True, "bias": True}
    assert mask["conv0"] == {"kernel": False} and mask["head"] == {"kernel": False, "bias": False}
    tx = freeze_batch_norm_params(
        optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9)), variables
    )
    tuned = _fine_tune(model, variables, tx)
    jax.tree.map(np.testing.assert_array_equal, tuned["batch_stats"], variables["batch_stats"])
    for name in ("bn0", "bn1"):
        jax.tree.map(
            np.testing.assert_array_equal, tuned["params"][name], variables["params"][name]
        )
    assert not np.array_equal(
        tuned["params"]["conv0"]["kernel"], variables["params"]["conv0"]["kernel"]
    )


def test_frozen_model_train_equals_eval_forward():
    model = SmallBNConvNet(widths=(4, 8), norm=frozen_batch_norm(momentum=0.9))
    variables = _pretrained(model)
    x, _ = _data()
    train_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(
        train_logits, SmallBNConvNet(widths=(4, 8)).apply(variables, x, train=False)
    )
    assert jnp.all(jnp.isfinite(train_logits))
