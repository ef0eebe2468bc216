"""Batch Renormalization against its definition written out by hand (float64 NumPy)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn import BatchRenorm, batch_renorm, renorm_clip_schedule

ATOL = 1e-5
EPS = 1e-3


def _reference(x, scale, bias, mean, var, r_max, d_max, momentum):
    """Ioffe (2017), Algorithm 1, in float64 (running var, not sigma, is averaged)."""
    x = np.asarray(x, np.float64)
    mu_b, var_b = x.mean(0), x.var(0)
    sigma_b, sigma = np.sqrt(var_b + EPS), np.sqrt(var + EPS)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - mean) / sigma, -d_max, d_max)
    y = scale * ((x - mu_b) / sigma_b * r + d) + bias
    new_mean = momentum * mean + (1 - momentum) * mu_b
    new_var = momentum * var + (1 - momentum) * var_b
    return y, new_mean, new_var, r, d


def _problem():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 4)) * [0.5, 1.0, 3.0, 1.0] + [0.0, 2.0, -1.0, 0.1]).astype(np.float32)
    params = {
        "scale": np.array([0.5, 1.0, 1.5, 2.0], np.float32),
        "bias": np.array([0.1, -0.2, 0.3, 0.0], np.float32),
    }
    stats = {
        "mean": np.array([0.0, 1.0, 0.5, 0.1], np.float32),
        "var": np.array([1.0, 0.5, 2.0, 1.0], np.float32),
    }
    return x, params, stats


def test_forward_and_running_stats_match_definition():
    x, params, stats = _problem()
    r_max, d_max = 1.5, 0.5
    y, new = batch_renorm(
        x, params, stats, training=True, r_max=r_max, d_max=d_max, momentum=0.9, epsilon=EPS
    )
    y_ref, mean_ref, var_ref, r, d = _reference(
        x, params["scale"], params["bias"], stats["mean"], stats["var"], r_max, d_max, 0.9
    )
    # The problem exercises both clips and the unclipped range.
    assert np.any(np.abs(r) == r_max) and np.any(np.abs(d) == d_max)
    assert np.any((r < r_max) & (r > 1 / r_max)) and np.any(np.abs(d) < d_max)
    np.testing.assert_allclose(y, y_ref, atol=ATOL)
    np.testing.assert_allclose(new["mean"], mean_ref, atol=ATOL)
    np.testing.assert_allclose(new["var"], var_ref, atol=ATOL)
    # Inference: the running statistics, like BatchNorm.
    y_eval, same = batch_renorm(x, params, stats, training=False, r_max=r_max, d_max=d_max)
    expected = params["scale"] * (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) + params["bias"]
    np.testing.assert_allclose(y_eval, expected, atol=ATOL)
    jax.tree.map(np.testing.assert_array_equal, same, stats)


def test_gradients_match_hand_written_reference_with_stopped_r_and_d():
    x, params, stats = _problem()
    dy = jax.random.normal(jax.random.key(0), x.shape)

    def reference(x, scale, bias):  # on (1, C) rows, explicitly
        mu_b, var_b = x.mean(0, keepdims=True), x.var(0, keepdims=True)
        sigma_b, sigma = jnp.sqrt(var_b + EPS), jnp.sqrt(stats["var"][None] + EPS)
        r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / 1.5, 1.5))
        d = jax.lax.stop_gradient(jnp.clip((mu_b - stats["mean"][None]) / sigma, -0.5, 0.5))
        return jnp.sum(dy * (scale[None] * ((x - mu_b) / sigma_b * r + d) + bias[None]))

    def ours(x, scale, bias):
        y, _ = batch_renorm(
            x,
            {"scale": scale, "bias": bias},
            stats,
            training=True,
            r_max=1.5,
            d_max=0.5,
            epsilon=EPS,
        )
        return jnp.sum(dy * y)

    args = (jnp.asarray(x), jnp.asarray(params["scale"]), jnp.asarray(params["bias"]))
    grads = jax.grad(ours, argnums=(0, 1, 2))(*args)
    expected = jax.grad(reference, argnums=(0, 1, 2))(*args)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=ATOL)


@pytest.mark.parametrize("params", [None, "full"])
def test_no_room_to_clip_is_batch_norm(params):
    x, full, stats = _problem()
    params = full if params else None

    def both(x):
        kw = dict(training=True, momentum=0.9, epsilon=EPS)
        a = batch_renorm(x, params, stats, r_max=1.0, d_max=0.0, **kw)
        b = jbn.batch_norm(x, params, stats, **kw)
        return a, b

    (ya, sa), (yb, sb) = both(x)
    np.testing.assert_allclose(ya, yb, atol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-7), sa, sb)
    ga = jax.grad(lambda x: jnp.sum(jnp.sin(both(x)[0][0])))(x)
    gb = jax.grad(lambda x: jnp.sum(jnp.sin(both(x)[1][0])))(x)
    np.testing.assert_allclose(ga, gb, atol=1e-6)


def test_schedule_values():
    schedule = functools.partial(renorm_clip_schedule, warmup_steps=10, ramp_steps=20)
    for step, (r, d) in {
        0: (1, 0),
        10: (1, 0),
        15: (1.5, 1.25),
        20: (2, 2.5),
        30: (3, 5),
        99: (3, 5),
    }.items():
        np.testing.assert_allclose(schedule(step), (r, d), atol=1e-6, err_msg=str(step))
    r, d = renorm_clip_schedule(15, warmup_steps=10, ramp_steps=20, d_ramp_steps=5)
    np.testing.assert_allclose((r, d), (1.5, 5.0))
    np.testing.assert_allclose(jax.jit(schedule)(jnp.int32(20)), (2.0, 2.5))
    np.testing.assert_allclose(renorm_clip_schedule(10, warmup_steps=10, ramp_steps=0), (3.0, 5.0))


def test_bad_clips_raise():
    x, params, stats = _problem()
    with pytest.raises(ValueError, match="r_max must be >= 1, got 0.5"):
        batch_renorm(x, params, stats, training=True, r_max=0.5, d_max=0.0)
    with pytest.raises(ValueError, match="d_max must be >= 0, got -1"):
        batch_renorm(x, params, stats, training=True, r_max=1.0, d_max=-1)


def test_module_counts_steps_follows_schedule_and_matches_functional():
    x, _, _ = _problem()
    schedule = functools.partial(renorm_clip_schedule, warmup_steps=1, ramp_steps=2)
    module = BatchRenorm(momentum=0.9, epsilon=EPS, clip_schedule=schedule)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    assert set(variables["batch_stats"]) == {"mean", "var", "count"}
    stats = {k: v for k, v in variables["batch_stats"].items() if k != "count"}
    params = variables["params"]
    for step in range(4):
        xs = x * (1 + step) + step
        y, updates = module.apply(variables, xs, use_running_average=False, mutable=["batch_stats"])
        r_max, d_max = schedule(step)
        y_ref, stats = batch_renorm(
            xs, params, stats, training=True, r_max=r_max, d_max=d_max, momentum=0.9, epsilon=EPS
        )
        np.testing.assert_allclose(y, y_ref, atol=1e-6)
        for k in ("mean", "var"):
            np.testing.assert_allclose(updates["batch_stats"][k], stats[k], atol=1e-6)
        assert int(updates["batch_stats"]["count"]) == step + 1
        variables = {**variables, **updates}
    # During warm-up (first step) it is jbn.BatchNorm.
    bn = jbn.BatchNorm(momentum=0.9, epsilon=EPS)
    v0 = module.init(jax.random.key(0), x, use_running_average=False)
    a = module.apply(v0, x, use_running_average=False, mutable=["batch_stats"])[0]
    b = bn.apply(
        {"params": v0["params"], "batch_stats": {k: v0["batch_stats"][k] for k in ("mean", "var")}},
        x,
        use_running_average=False,
        mutable=["batch_stats"],
    )[0]
    np.testing.assert_allclose(a, b, atol=1e-6)
