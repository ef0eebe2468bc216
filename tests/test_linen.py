"""jbn.BatchNorm as a drop-in for flax.linen.BatchNorm.

Tolerance 1e-6 (gradients: 1e-6 of the network's largest gradient; bfloat16
outputs: 2e-2, their rounding).
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_modes import standard_promotion

import jbn

TOL = 1e-6


def _run(module, variables, x, **kwargs):
    # flax, the reference, with JAX's default promotion even in the strict pass.
    with standard_promotion() if isinstance(module, nn.BatchNorm) else contextlib.nullcontext():
        return module.apply(variables, x, mutable=["batch_stats"], **kwargs)


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(), (8, 5)),
        (dict(momentum=0.9, epsilon=1e-3), (4, 6, 6, 3)),
        (dict(axis=1), (4, 3, 5, 5)),
        (dict(axis=(1, 2)), (6, 2, 3)),
        (dict(use_bias=False), (8, 4)),
        (dict(use_scale=False, use_bias=False), (8, 4)),
        (dict(param_dtype=jnp.float16), (8, 4)),
    ],
)
def test_same_variables_outputs_and_stats_as_flax(kwargs, shape):
    x = jax.random.normal(jax.random.key(0), shape) * 2.0 + 0.5
    ours, theirs = jbn.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
    v_ours = ours.init(jax.random.key(1), x, use_running_average=False)
    with standard_promotion():
        v_theirs = theirs.init(jax.random.key(1), x, use_running_average=False)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_theirs)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), v_ours) == jax.tree.map(
        lambda a: (a.shape, a.dtype), v_theirs
    )
    # Perturb the parameters so the affine part is exercised.
    v = jax.tree.map(
        lambda a: a + 0.1 * jnp.arange(a.size, dtype=a.dtype).reshape(a.shape), v_theirs
    )
    for step in range(3):
        xs = x * (1 + step) + step
        y_ours, upd_ours = _run(ours, v, xs, use_running_average=False)
        y_theirs, upd_theirs = _run(theirs, v, xs, use_running_average=False)
        assert y_ours.dtype == y_theirs.dtype and y_ours.shape == y_theirs.shape
        np.testing.assert_allclose(y_ours, y_theirs, atol=TOL, rtol=TOL)
        for k in ("mean", "var"):
            np.testing.assert_allclose(
                upd_ours["batch_stats"][k], upd_theirs["batch_stats"][k], rtol=TOL, atol=TOL
            )
        v = {**v, **upd_theirs}
    y_ours = ours.apply(v, x, use_running_average=True)
    with standard_promotion():
        y_theirs = theirs.apply(v, x, use_running_average=True)
    np.testing.assert_allclose(y_ours, y_theirs, atol=TOL, rtol=TOL)


def test_checkpoints_move_both_ways_and_init_does_not_update_stats():
    x = jax.random.normal(jax.random.key(2), (16, 4)) + 3.0
    v_theirs = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    np.testing.assert_array_equal(v_theirs["batch_stats"]["mean"], 0.0)
    v_ours = jbn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    np.testing.assert_array_equal(v_ours["batch_stats"]["mean"], 0.0)
    np.testing.assert_array_equal(v_ours["batch_stats"]["var"], 1.0)
    # flax variables run in jbn and jbn variables run in flax, same results.
    a = jbn.BatchNorm(use_running_average=True).apply(v_theirs, x)
    b = nn.BatchNorm(use_running_average=True).apply(v_ours, x)
    np.testing.assert_allclose(a, b, atol=TOL)


def test_half_precision_output_dtype_follows_flax():
    x = (jax.random.normal(jax.random.key(3), (8, 4)) * 3).astype(jnp.bfloat16)
    for kwargs in (dict(), dict(dtype=jnp.bfloat16)):
        ours, theirs = (
            jbn.BatchNorm(use_running_average=False, **kwargs),
            nn.BatchNorm(use_running_average=False, **kwargs),
        )
        with standard_promotion():
            v = theirs.init(jax.random.key(0), x)
        y_ours, s_ours = _run(ours, v, x)
        y_theirs, s_theirs = _run(theirs, v, x)
        assert y_ours.dtype == y_theirs.dtype
        assert s_ours["batch_stats"]["var"].dtype == jnp.float32
        np.testing.assert_allclose(
            np.asarray(y_ours, np.float32), np.asarray(y_theirs, np.float32), atol=2e-2
        )
        np.testing.assert_allclose(
            s_ours["batch_stats"]["var"], s_theirs["batch_stats"]["var"], rtol=1e-5
        )


def test_mask_matches_flax():
    x = jax.random.normal(jax.random.key(4), (10, 3, 4))
    mask = jax.random.bernoulli(jax.random.key(5), 0.6, (10, 3, 1))
    ours, theirs = jbn.BatchNorm(use_running_average=False), nn.BatchNorm(use_running_average=False)
    v = theirs.init(jax.random.key(0), x)
    y_ours, s_ours = _run(ours, v, x, mask=mask)
    y_theirs, s_theirs = _run(theirs, v, x, mask=mask)
    np.testing.assert_allclose(y_ours, y_theirs, atol=TOL)
    np.testing.assert_allclose(
        s_ours["batch_stats"]["var"], s_theirs["batch_stats"]["var"], rtol=TOL
    )


def test_gradients_match_flax_in_a_small_network():
    class Net(nn.Module):
        norm: type

        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(6)(x)
            x = self.norm(use_running_average=not train, momentum=0.9)(x)
            return nn.Dense(2)(nn.relu(x))

    x = jax.random.normal(jax.random.key(6), (12, 5))
    v = Net(nn.BatchNorm).init(jax.random.key(0), x, train=False)

    def loss(params, norm):
        y, _ = Net(norm).apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y**2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ours, g_theirs = grad(v["params"], jbn.BatchNorm), grad(v["params"], nn.BatchNorm)
    # The first layer's bias gets a zero gradient (BatchNorm removes it), so
    # the absolute tolerance is relative to the largest gradient of the network.
    largest = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g_theirs))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL * largest),
        g_ours,
        g_theirs,
    )


def test_extras_track_count_and_unbiased_var():
    x = jax.random.normal(jax.random.key(7), (5, 3))
    m = jbn.BatchNorm(
        use_running_average=False, momentum=None, track_count=True, unbiased_running_var=True
    )
    v = m.init(jax.random.key(0), x)
    assert int(v["batch_stats"]["count"]) == 0
    _, upd = m.apply(v, x, mutable=["batch_stats"])
    assert int(upd["batch_stats"]["count"]) == 1
    np.testing.assert_allclose(
        upd["batch_stats"]["var"], np.var(np.asarray(x, np.float64), 0, ddof=1), rtol=TOL
    )
