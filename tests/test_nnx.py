"""jbn.nnx.BatchNorm as a drop-in for flax.nnx.BatchNorm (tolerance 1e-6)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from run_modes import standard_promotion

import jbn
import jbn.nnx

TOL = 1e-6


def _flax(module, *args, **kwargs):
    """Calls a flax module, the reference, with JAX's default promotion even in the strict pass."""
    with standard_promotion():
        return module(*args, **kwargs)


def _assert_close(a, b, tol=TOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def _same_state(a, b, tol=TOL):
    sa, sb = nnx.state(a), nnx.state(b)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    jax.tree.map(lambda u, v: _assert_close(u, v, tol), sa, sb)


def test_import_does_not_clash_with_package():
    assert jbn.nnx.BatchNorm.__module__ == "jbn.nnx"
    assert isinstance(jbn.BatchNorm, type)


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(), (8, 5)),
        (dict(momentum=0.9, epsilon=1e-3), (4, 6, 6, 5)),
        (dict(axis=1), (4, 5, 3, 3)),
        (dict(use_bias=False, use_scale=False), (8, 5)),
        (dict(param_dtype=jnp.float16), (8, 5)),
    ],
)
def test_same_variables_outputs_and_stats_as_flax(kwargs, shape):
    ours = jbn.nnx.BatchNorm(5, rngs=nnx.Rngs(0), **kwargs)
    theirs = nnx.BatchNorm(5, rngs=nnx.Rngs(0), **kwargs)
    _same_state(ours, theirs, 0)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(ours)) == jax.tree.map(
        lambda a: (a.shape, a.dtype), nnx.state(theirs)
    )
    x = jax.random.normal(jax.random.key(0), shape) * 2 + 0.5
    for step in range(3):
        xs = x * (1 + step) + step
        y_ours, y_theirs = ours(xs), _flax(theirs, xs)
        assert y_ours.dtype == y_theirs.dtype and y_ours.shape == y_theirs.shape
        _assert_close(y_ours, y_theirs)
        _same_state(ours, theirs)
    ours.eval(), theirs.eval()
    _assert_close(ours(x), _flax(theirs, x))
    _same_state(ours, theirs)
    _assert_close(ours(x, use_running_average=False), _flax(theirs, x, use_running_average=False))


def test_state_moves_both_ways():
    x = jax.random.normal(jax.random.key(1), (16, 4)) + 3
    theirs = nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
    theirs(x)
    ours = jbn.nnx.BatchNorm(4, momentum=0.5, use_running_average=True, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(theirs))
    theirs.eval()
    _assert_close(ours(x), theirs(x))
    ours.train()
    ours(2 * x)
    nnx.update(theirs, nnx.state(ours))
    _same_state(ours, theirs, 0)


class _Net(nnx.Module):
    def __init__(self, norm, rngs):
        self.fc1 = nnx.Linear(4, 6, rngs=rngs)
        self.bn = norm(6, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.bn(self.fc1(x))))


@nnx.jit
def _train_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _eval_step(model, x):
    return model(x)


def test_jitted_train_and_eval_steps_match_flax():
    kx, ky = jax.random.split(jax.random.key(2))
    x, y = jax.random.normal(kx, (16, 4)), jax.random.randint(ky, (16,), 0, 2)
    models = [_Net(norm, nnx.Rngs(0)) for norm in (jbn.nnx.BatchNorm, nnx.BatchNorm)]
    optimizers = [nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param) for m in models]
    for _ in range(3):
        losses = [_train_step(m, o, x, y) for m, o in zip(models, optimizers, strict=True)]
        _assert_close(*losses)
        _same_state(*models, tol=1e-5)
    mean_before = models[0].bn.mean[...]
    for m in models:
        m.eval()
    _assert_close(_eval_step(models[0], x), _eval_step(models[1], x), 1e-5)
    np.testing.assert_array_equal(models[0].bn.mean[...], mean_before)


def test_extras_count_unbiased_and_errors():
    x = jax.random.normal(jax.random.key(3), (4, 3))
    layer = jbn.nnx.BatchNorm(
        3, momentum=None, track_count=True, unbiased_running_var=True, rngs=nnx.Rngs(0)
    )
    layer(x)
    layer(x)
    assert int(layer.count[...]) == 2
    _assert_close(layer.mean[...], np.mean(x, 0))
    _assert_close(layer.var[...], np.var(x, 0, ddof=1), 1e-5)
    with pytest.raises(ValueError, match="No `use_running_average` argument"):
        jbn.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x)
