"""jbn.equinox.BatchNorm as a drop-in for equinox.nn.BatchNorm(mode="batch").

Training outputs and running statistics agree with Equinox within 1e-6 at every
step; inference outputs agree wherever Equinox's debias division is the identity
(before the first step, and once ``momentum ** steps`` is below float32
resolution). The deliberate difference (jbn uses the running statistics as they
are) is pinned by `test_inference_differs_from_equinox_only_by_its_debias_division`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

eqx = pytest.importorskip("equinox")

import jbn.equinox  # noqa: E402

TOL = 1e-6


def _assert_close(a, b, tol=TOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def _batched(layer, axis_name="batch"):
    """``layer`` over a batch: per-example inputs, one shared state."""
    return jax.vmap(layer, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def _pair(input_size=3, **kwargs):
    """(ours, our state, Equinox's, its state) built with the same arguments."""
    ours, ours_state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(input_size, "batch", **kwargs)
    theirs, theirs_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        input_size, "batch", mode="batch", **kwargs
    )
    return ours, ours_state, theirs, theirs_state


def _running(layer, state):
    mean, var = state.get(layer.batch_state_index)
    return np.asarray(mean), np.asarray(var), int(state.get(layer.batch_counter))


def _assert_same_running(a, b, tol=TOL):
    for u, v in zip(a, b, strict=True):
        _assert_close(u, v, tol)


def _inputs(step, shape=(8, 3, 4, 4)):
    return 2.0 + 3.0 * jax.random.normal(jax.random.key(step), shape) * (1 + step)


def _reference_norm(x, mean, var, weight, bias, eps=1e-5):
    """float64 NumPy normalization of a batch ``(N, C, ...)`` with per-channel stats."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x = np.asarray(x, np.float64)
    y = (x - np.reshape(mean, shape)) / np.sqrt(np.reshape(var, shape) + eps)
    return y * np.reshape(weight, shape) + np.reshape(bias, shape)


def test_state_and_parameters_have_equinox_layout():
    ours, ours_state, theirs, theirs_state = _pair()
    assert jax.tree.structure(ours_state) == jax.tree.structure(theirs_state)
    spec = functools.partial(jax.tree.map, lambda a: jax.typeof(a))
    assert jax.tree.leaves(spec(ours_state)) == jax.tree.leaves(spec(theirs_state))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ours_state, theirs_state)
    assert ours.weight.dtype == theirs.weight.dtype and ours.bias.shape == theirs.bias.shape
    _assert_close(ours.weight, theirs.weight, 0)
    assert isinstance(ours, eqx.nn.StatefulLayer) and ours.is_stateful()


@pytest.mark.parametrize(
    "kwargs,shape,steps",
    [
        (dict(momentum=0.1), (8, 3, 4, 4), 8),
        (dict(momentum=0.0, eps=1e-3), (6, 3, 5), 3),
        (dict(momentum=0.1, channelwise_affine=False), (16, 3), 8),
    ],
)
def test_training_steps_then_inference_match_equinox(kwargs, shape, steps):
    ours, ours_state, theirs, theirs_state = _pair(**kwargs)
    # Untrained inference: both use mean 0 and var 1.
    x = _inputs(0, shape)
    _assert_close(
        _batched(eqx.nn.inference_mode(ours))(x, ours_state)[0],
        _batched(eqx.nn.inference_mode(theirs))(x, theirs_state)[0],
    )
    if ours.channelwise_affine:  # Non-trivial affine parameters, the same in both.
        weight = 1 + jax.random.uniform(jax.random.key(7), (3,))
        bias = jax.random.normal(jax.random.key(8), (3,))
        ours = eqx.tree_at(lambda m: (m.weight, m.bias), ours, (weight, bias))
        theirs = eqx.tree_at(lambda m: (m.weight, m.bias), theirs, (weight, bias))
    for step in range(steps):
        x = _inputs(step, shape)
        y_ours, ours_state = _batched(ours)(x, ours_state)
        y_theirs, theirs_state = _batched(theirs)(x, theirs_state)
        assert y_ours.shape == y_theirs.shape and y_ours.dtype == y_theirs.dtype
        _assert_close(y_ours, y_theirs)
        _assert_same_running(_running(ours, ours_state), _running(theirs, theirs_state))
    # momentum ** steps <= 1e-8: Equinox's debias division is 1 in float32.
    x = _inputs(100, shape)
    y_ours, after = _batched(eqx.nn.inference_mode(ours))(x, ours_state)
    y_theirs, _ = _batched(eqx.nn.inference_mode(theirs))(x, theirs_state)
    _assert_close(y_ours, y_theirs)
    _assert_same_running(_running(ours, after), _running(ours, ours_state), 0)  # Unchanged.


def test_training_matches_float64_reference():
    ours, state, _, _ = _pair(momentum=0.9)
    x = _inputs(3)
    y, state = _batched(ours)(x, state)
    xn = np.asarray(x, np.float64)
    mean, var = xn.mean((0, 2, 3)), xn.var((0, 2, 3))
    _assert_close(y, _reference_norm(xn, mean, var, 1, 0), 2e-6)
    running_mean, running_var, count = _running(ours, state)
    _assert_close(running_mean, 0.1 * mean)
    _assert_close(running_var, 0.9 + 0.1 * var)
    assert count == 1


def test_inference_differs_from_equinox_only_by_its_debias_division():
    """Equinox divides the running stats by 1 - momentum**steps; its var starts at 1.

    At the default momentum 0.99 that inflates its inference variance by
    0.99**3 / (1 - 0.99**3) = 32.7 after three steps; jbn normalizes with the
    running statistics as stored (the same values in both states).
    """
    ours, ours_state, theirs, theirs_state = _pair()
    for step in range(3):
        _, ours_state = _batched(ours)(_inputs(step), ours_state)
        _, theirs_state = _batched(theirs)(_inputs(step), theirs_state)
    mean, var, count = _running(ours, ours_state)
    _assert_same_running((mean, var, count), _running(theirs, theirs_state))
    x = _inputs(9)
    y_ours, _ = _batched(eqx.nn.inference_mode(ours))(x, ours_state)
    y_theirs, _ = _batched(eqx.nn.inference_mode(theirs))(x, theirs_state)
    _assert_close(y_ours, _reference_norm(x, mean, var, 1, 0), 2e-6)
    debias = 1 - 0.99**count
    _assert_close(y_theirs, _reference_norm(x, mean / debias, var / debias, 1, 0), 2e-6)
    batch_vars = [np.asarray(_inputs(step), np.float64).var((0, 2, 3)) for step in range(3)]
    average = sum(0.01 * 0.99 ** (2 - step) * v for step, v in enumerate(batch_vars)) / debias
    _assert_close(var / debias - average, 0.99**3 / debias, 1e-4)  # The inflation: 32.7.


def _clone(state):
    """A copy of an ``eqx.nn.State`` (``state.set`` invalidates the original)."""
    leaves, treedef = jax.tree.flatten(state)
    return jax.tree.unflatten(treedef, leaves)


def test_state_moves_between_equinox_and_jbn_layers():
    ours, _, theirs, theirs_state = _pair(momentum=0.5)
    _, theirs_state = _batched(theirs)(_inputs(1), theirs_state)
    # Equinox's state, one step in, drives our layer for step 2, and back again.
    _, ours_state = _batched(ours)(_inputs(2), _clone(theirs_state))
    _, theirs_state = _batched(theirs)(_inputs(2), theirs_state)
    _assert_same_running(_running(ours, ours_state), _running(theirs, theirs_state))
    _, mixed_state = _batched(theirs)(_inputs(3), ours_state)
    _, theirs_state = _batched(theirs)(_inputs(3), theirs_state)
    _assert_same_running(_running(theirs, mixed_state), _running(theirs, theirs_state))
    assert _running(theirs, mixed_state)[2] == 3


def test_mask_leaves_padding_examples_out():
    ours, state, _, _ = _pair(momentum=0.9)
    valid, padding = _inputs(4, (5, 3, 4, 4)), 1e3 * jnp.ones((3, 3, 4, 4))
    x = jnp.concatenate([valid, padding])
    mask = jnp.arange(8) < 5  # One flag per example; broadcasts to its (3, 4, 4).
    layer = jax.vmap(
        lambda xi, s, m: ours(xi, s, mask=m),
        axis_name="batch",
        in_axes=(0, None, 0),
        out_axes=(0, None),
    )
    y, masked_state = layer(x, state, mask)
    y_valid, valid_state = _batched(ours)(valid, state)
    _assert_close(y[:5], y_valid)
    _assert_same_running(_running(ours, masked_state), _running(ours, valid_state))


def test_unbiased_running_var_and_cumulative_average():
    ours, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        3, "batch", momentum=0.0, unbiased_running_var=True
    )
    x = _inputs(5, (4, 3, 2))
    _, state = _batched(ours)(x, state)
    _assert_close(_running(ours, state)[1], np.asarray(x, np.float64).var((0, 2), ddof=1))

    ours, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch", momentum=None)
    batches = [_inputs(6, (4, 3, 2)), _inputs(7, (4, 3, 2))]
    for x in batches:
        _, state = _batched(ours)(x, state)
    means = [np.asarray(x, np.float64).mean((0, 2)) for x in batches]
    _assert_close(_running(ours, state)[0], np.mean(means, 0))


def test_bfloat16_statistics_accumulate_in_float32():
    # |mean| >> std: bfloat16 has 8 bits of mantissa, so a mean rounded to it is
    # off by up to 0.25 here and the variance with it.
    ours, state, theirs, theirs_state = _pair(dtype=jnp.bfloat16, momentum=0.0)
    x = (100 + jax.random.normal(jax.random.key(0), (64, 3, 4, 4))).astype(jnp.bfloat16)
    exact_var = np.asarray(x, np.float64).var((0, 2, 3))
    y, state = _batched(ours)(x, state)
    _, theirs_state = _batched(theirs)(x, theirs_state)
    assert y.dtype == jnp.bfloat16
    assert state.get(ours.batch_state_index)[1].dtype == jnp.float32
    ours_error = np.max(np.abs(_running(ours, state)[1] / exact_var - 1))
    theirs_error = np.max(np.abs(_running(theirs, theirs_state)[1] / exact_var - 1))
    assert ours_error < 1e-6, ours_error
    assert theirs_error > 1e-2, theirs_error  # Equinox keeps bfloat16 statistics.


def _loss(model, state, x):
    y, state = _batched(model)(x, state)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size), state


def test_filter_jit_and_filter_grad_match_equinox():
    ours, ours_state, theirs, theirs_state = _pair(momentum=0.9)
    weight = 1 + jax.random.uniform(jax.random.key(7), (3,))
    ours = eqx.tree_at(lambda m: m.weight, ours, weight)
    theirs = eqx.tree_at(lambda m: m.weight, theirs, weight)
    grad = eqx.filter_jit(eqx.filter_grad(_loss, has_aux=True))
    x = _inputs(2)
    for _ in range(2):
        g_ours, ours_state = grad(ours, ours_state, x)
        g_theirs, theirs_state = grad(theirs, theirs_state, x)
        _assert_close(g_ours.weight, g_theirs.weight, 1e-5)
        _assert_close(g_ours.bias, g_theirs.bias, 1e-5)
    dx_ours = eqx.filter_jit(jax.grad(lambda x: _loss(ours, ours_state, x)[0]))(x)
    dx_theirs = eqx.filter_jit(jax.grad(lambda x: _loss(theirs, theirs_state, x)[0]))(x)
    _assert_close(dx_ours, dx_theirs, 1e-5)
    assert _running(ours, ours_state)[2] == 2


def _cnn(norm, key):
    conv, linear = jax.random.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(3, 4, 3, padding=1, use_bias=False, key=conv),
            norm(4, "batch", momentum=0.5),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.MaxPool2d(2, 2),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(4 * 4 * 4, 10, key=linear),
        ]
    )


def _train(norm, steps, x, labels):
    model, state = eqx.nn.make_with_state(_cnn)(norm, jax.random.key(0))
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state, opt_state):
        def loss_fn(model):
            logits, new_state = _batched(model)(x, state)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new_state

        (loss, state_), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(model, updates), state_, opt_state, loss

    losses = []
    for _ in range(steps):
        model, state, opt_state, loss = step(model, state, opt_state)
        losses.append(float(loss))
    return model, state, losses


def test_small_cnn_trains_like_equinox():
    x = jax.random.normal(jax.random.key(1), (16, 3, 8, 8))
    labels = jnp.arange(16) % 10
    ours, ours_state, ours_losses = _train(jbn.equinox.BatchNorm, 6, x, labels)
    theirs, _, theirs_losses = _train(
        functools.partial(eqx.nn.BatchNorm, mode="batch"), 6, x, labels
    )
    np.testing.assert_allclose(ours_losses, theirs_losses, rtol=1e-5)
    assert ours_losses[-1] < 0.5 * ours_losses[0], ours_losses
    for index in (0, 1, 5):  # Conv, BatchNorm, Linear.
        ours_leaves = jax.tree.leaves(eqx.filter(ours.layers[index], eqx.is_inexact_array))
        theirs_leaves = jax.tree.leaves(eqx.filter(theirs.layers[index], eqx.is_inexact_array))
        for a, b in zip(ours_leaves, theirs_leaves, strict=True):
            _assert_close(a, b, 1e-5)
    # Inference mode: each example's output no longer depends on the others.
    evaluate = eqx.filter_jit(lambda m, s, x: _batched(eqx.nn.inference_mode(m))(x, s)[0])
    _assert_close(evaluate(ours, ours_state, x)[:4], evaluate(ours, ours_state, x[:4]), 1e-5)
    assert not np.allclose(evaluate(ours, ours_state, x), _batched(ours)(x, ours_state)[0])


def test_errors_name_the_problem():
    ours, state, _, _ = _pair()
    x = _inputs(0)
    with pytest.raises(
        NameError, match=r"call it per example under jax.vmap\(\.\.\., axis_name='batch'\)"
    ):
        ours(x[0], state)
    with pytest.raises(NameError, match="mapped axis 'batch'"):
        _batched(ours, axis_name="examples")(x, state)
    with pytest.raises(
        ValueError, match=r"input_size=3\) expects one example of shape \(3, \.\.\.\)"
    ):
        _batched(ours)(x[:, :2], state)
    with pytest.raises(ValueError, match=r"got an input of shape \(8, 3, 4, 4\)"):
        eqx.nn.inference_mode(ours)(x, state)  # A whole batch, not vmapped.
    with pytest.raises(TypeError, match="floating-point input"):
        _batched(ours)(jnp.ones((8, 3, 4), jnp.int32), state)
    with pytest.raises(ValueError, match="mode='batch' only, got mode='ema'"):
        jbn.equinox.BatchNorm(3, "batch", mode="ema")
    with pytest.raises(ValueError, match="momentum must be in"):
        jbn.equinox.BatchNorm(3, "batch", momentum=1.5)
    with pytest.raises(ValueError, match="epsilon must be positive"):
        jbn.equinox.BatchNorm(3, "batch", eps=0.0)
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        jbn.equinox.BatchNorm(0, "batch")
    # A failed call leaves the state usable and unchanged.
    y, state = _batched(ours)(x, state)
    assert _running(ours, state)[2] == 1


def test_inference_needs_no_axis_name():
    ours, state, _, _ = _pair()
    x = _inputs(0)
    y, after = jax.vmap(eqx.nn.inference_mode(ours), in_axes=(0, None), out_axes=(0, None))(
        x, state
    )
    _assert_close(y, _reference_norm(x, 0, 1, 1, 0), 2e-6)
    y_call, _ = jax.vmap(
        functools.partial(ours, inference=True), in_axes=(0, None), out_axes=(0, None)
    )(x, after)
    _assert_close(y_call, y, 0)


def test_several_nested_vmap_axis_names():
    # Statistics over both mapped axes (jbn.core.statistics gathers with psum,
    # which works over several nested vmap axes; lax.all_gather does not).
    ours, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, ("outer", "inner"), momentum=0.9)
    inner = jax.vmap(ours, axis_name="inner", in_axes=(0, None), out_axes=(0, None))
    outer = jax.vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, None))
    x = _inputs(0)
    y, state = outer(x.reshape(2, 4, 3, 4, 4), state)
    xn = np.asarray(x, np.float64)
    mean, var = xn.mean((0, 2, 3)), xn.var((0, 2, 3))
    _assert_close(y.reshape(x.shape), _reference_norm(xn, mean, var, 1, 0), 2e-6)
    running_mean, running_var, _ = _running(ours, state)
    _assert_close(running_mean, 0.1 * mean)
    _assert_close(running_var, 0.9 + 0.1 * var)
