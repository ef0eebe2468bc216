"""Functional core against float64 NumPy references and plain-autodiff references.

Tolerances: float64 comparisons use 1e-10 (rtol/atol); float32 ones 1e-5.
"""

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from compiled_hlo import full_size_fusions

import jbn
from jbn.core import validation

EPS = 1e-5


def np_batch_norm(x, scale, bias, feature_axes, eps=EPS, mask=None):
    """Float64 NumPy reference: returns (y, mean, biased var, count)."""
    x = np.asarray(x, np.float64)
    red = tuple(a for a in range(x.ndim) if a not in feature_axes)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = w.sum(red, keepdims=True)
    mean = (w * x).sum(red, keepdims=True) / n
    var = (w * (x - mean) ** 2).sum(red, keepdims=True) / n
    shape = [x.shape[a] if a in feature_axes else 1 for a in range(x.ndim)]
    scale = np.broadcast_to(scale, [x.shape[a] for a in feature_axes])
    bias = np.broadcast_to(bias, [x.shape[a] for a in feature_axes])
    y = (x - mean) / np.sqrt(var + eps) * np.reshape(scale, shape) + np.reshape(bias, shape)
    return y, mean.reshape(-1), var.reshape(-1), n.reshape(-1)


def plain_batch_norm(x, scale, bias, red, eps=EPS):
    """Plain-autodiff reference (two-pass, no custom derivative)."""
    mean = jnp.mean(x, red, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), red, keepdims=True)
    scale, bias = jnp.reshape(scale, mean.shape), jnp.reshape(bias, mean.shape)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


SHAPES_AND_AXES = [
    ((16, 5), -1),
    ((4, 7, 5), -1),
    ((3, 4, 4, 5), -1),
    ((2, 3, 4, 4, 5), -1),
    ((3, 5, 4, 4), 1),  # NCHW
    ((4, 3, 5), (1, 2)),  # several feature axes
]


@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES)
def test_training_matches_float64_reference(shape, axis):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    feature_axes = validation.canonical_axes(len(shape), axis)
    fshape = tuple(shape[a] for a in feature_axes)
    params = {
        "scale": rng.normal(size=fshape).astype(np.float32),
        "bias": rng.normal(size=fshape).astype(np.float32),
    }
    stats = jbn.init_batch_stats(fshape)
    y, new = jbn.batch_norm(x, params, stats, training=True, axis=axis, momentum=0.9)
    y_ref, mean, var, _ = np_batch_norm(x, params["scale"], params["bias"], feature_axes)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(new["mean"].reshape(-1), 0.1 * mean, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(new["var"].reshape(-1), 0.9 + 0.1 * var, atol=1e-6, rtol=1e-5)
    assert new["mean"].shape == fshape and new["mean"].dtype == jnp.float32


def test_inference_uses_running_stats_and_returns_them_unchanged():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    stats = {"mean": jnp.array([0.5, -1.0, 2.0]), "var": jnp.array([4.0, 0.25, 1.0])}
    params = {"scale": jnp.array([1.0, 2.0, 3.0]), "bias": jnp.array([0.0, 1.0, -1.0])}
    y, new = jbn.batch_norm(x, params, stats, training=False)
    ref = (x - np.array([0.5, -1.0, 2.0])) / np.sqrt(np.array([4.0, 0.25, 1.0]) + EPS) * [
        1,
        2,
        3,
    ] + [0, 1, -1]
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    for k in stats:
        np.testing.assert_array_equal(new[k], stats[k])


def test_params_none_is_no_affine():
    x = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
    y, _ = jbn.batch_norm(x, None, jbn.init_batch_stats(4), training=True)
    np.testing.assert_allclose(y, np_batch_norm(x, 1.0, 0.0, (1,))[0], atol=1e-5)


class NumpyReferenceBatchNorm:
    """The reference notebook's NumPy class, verbatim in behaviour."""

    def __init__(self, dim, momentum=0.9, eps=1e-5):
        self.gamma, self.beta = np.ones(dim), np.zeros(dim)
        self.running_mean, self.running_var = np.zeros(dim), np.zeros(dim)
        self.momentum, self.eps = momentum, eps

    def forward(self, x, training=True):
        if training:
            mu, var = x.mean(0), x.var(0)
            self.running_mean = self.momentum * self.running_mean + (1 - self.momentum) * mu
            self.running_var = self.momentum * self.running_var + (1 - self.momentum) * var
        else:
            mu, var = self.running_mean, self.running_var
        return self.gamma * (x - mu) / np.sqrt(var + self.eps) + self.beta


def test_reproduces_the_numpy_reference_class_exactly():
    rng = np.random.default_rng(3)
    ref = NumpyReferenceBatchNorm(3)
    params = jbn.init_params(3)
    stats = {"mean": jnp.zeros(3), "var": jnp.zeros(3)}  # the class's zero-initialised stats
    for _ in range(5):
        x = rng.normal(1.0, 2.0, (4, 3)).astype(np.float32)
        y, stats = jbn.batch_norm(x, params, stats, training=True, momentum=0.9)
        np.testing.assert_allclose(y, ref.forward(x.astype(np.float64)), atol=1e-5)
        np.testing.assert_allclose(stats["mean"], ref.running_mean, atol=1e-6)
        np.testing.assert_allclose(stats["var"], ref.running_var, atol=1e-6)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    y, _ = jbn.batch_norm(x, params, stats, training=False)
    np.testing.assert_allclose(y, ref.forward(x.astype(np.float64), training=False), atol=1e-5)


def test_cumulative_average_momentum_none():
    rng = np.random.default_rng(4)
    stats = jbn.init_batch_stats(2, with_count=True)
    batches = [rng.normal(i, 1.0 + i, (10, 2)).astype(np.float32) for i in range(4)]
    for x in batches:
        _, stats = jbn.batch_norm(x, None, stats, training=True, momentum=None)
    np.testing.assert_allclose(stats["mean"], np.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], np.mean([b.var(0) for b in batches], 0), rtol=1e-5)
    assert stats["count"] == 4 and stats["count"].dtype == jnp.int32


def test_momentum_none_without_count_is_an_error():
    with pytest.raises(
        ValueError, match=r'momentum=None \(cumulative average\) needs stats\["count"\]'
    ):
        jbn.batch_norm(
            jnp.ones((4, 2)), None, jbn.init_batch_stats(2), training=True, momentum=None
        )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_in_same_dtype_out_stats_float32(dtype):
    x = jnp.asarray(np.random.default_rng(5).normal(3.0, 2.0, (64, 8)), dtype)
    y, stats = jbn.batch_norm(x, jbn.init_params(8), jbn.init_batch_stats(8), training=True)
    assert (
        y.dtype == dtype
        and stats["mean"].dtype == jnp.float32
        and stats["var"].dtype == jnp.float32
    )
    ref = np_batch_norm(np.asarray(x, np.float64), 1.0, 0.0, (1,))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref[0], atol=2e-2)
    np.testing.assert_allclose(stats["var"], 0.99 + 0.01 * ref[2], rtol=1e-6)


def test_variance_is_accurate_when_mean_dominates():
    # mean / std = 1e4 in float32: jbn stays within 1e-5, flax's fast variance does not.
    x = np.random.default_rng(6).normal(1e4, 1.0, (256, 8, 8, 4)).astype(np.float32)
    true_var = np.asarray(x, np.float64).var((0, 1, 2))
    got = jbn.moments(x).var
    assert np.max(np.abs(got - true_var) / true_var) <= 1e-5
    flax_vars = nn.BatchNorm(use_running_average=False, momentum=0.0).init_with_output(
        jax.random.key(0), x
    )
    flax_var = flax_vars[1]["batch_stats"]["var"]
    flax_err = np.max(np.abs(np.asarray(flax_var) - true_var) / true_var)
    assert flax_err > 1e-3, flax_err  # documents the failure mode jbn avoids


def documented_variance_bound(mean_over_std):
    """jbn.core.statistics' float32 bound, ``(1.2e-7 |mean| / std)**2 + 2e-7``, with 2x margin."""
    return 2 * ((1.2e-7 * mean_over_std) ** 2 + 2e-7)


@pytest.mark.parametrize("mean_over_std", [0.0, 1e2, 1e3, 1e4, 3e4, 1e5])
@pytest.mark.parametrize("std", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("masked", [False, True])
def test_variance_error_within_the_documented_bound(mean_over_std, std, masked):
    # float64 NumPy on the float32 values as the reference, any scale; within
    # 1e-5 up to mean/std of about 2.5e4 (measured 1.2e-6 at 1e4, 4.7e-5 at 1e5).
    rng = np.random.default_rng(int(mean_over_std) + 7)
    x = rng.normal(mean_over_std * std, std, (64, 8, 8, 3)).astype(np.float32)
    mask = rng.random((64, 8, 8, 1)) > 0.4 if masked else None
    valid = (
        np.asarray(x, np.float64)[np.broadcast_to(mask, x.shape)].reshape(-1, 3)
        if masked
        else (np.asarray(x, np.float64).reshape(-1, 3))
    )
    got = np.asarray(jbn.moments(x, mask=mask).var, np.float64)
    error = np.max(np.abs(got / valid.var(0) - 1))
    assert error <= documented_variance_bound(mean_over_std), error
    if mean_over_std <= 1e4:
        assert error <= 1e-5


def test_variance_is_never_negative_and_constant_input_is_finite():
    x = jnp.full((32, 3), 1234.5678, jnp.float32)
    m = jbn.moments(x)
    np.testing.assert_array_equal(m.var, 0.0)
    y, _ = jbn.batch_norm(x, jbn.init_params(3), jbn.init_batch_stats(3), training=True)
    np.testing.assert_array_equal(y, 0.0)


def _loss_pair(red, mask=None):
    def ours(x, g, b):
        y, _ = jbn.batch_norm(
            x,
            {"scale": g, "bias": b},
            jbn.init_batch_stats(g.shape, jnp.float64),
            training=True,
            mask=mask,
        )
        return y

    def ref(x, g, b):
        return plain_batch_norm(x, g, b, red)

    return ours, ref


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 3, 2)])
def test_first_and_second_derivatives_match_plain_autodiff_float64(shape):
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        x = jnp.asarray(rng.normal(1.0, 2.0, shape))
        g = jnp.asarray(rng.normal(size=shape[-1:]))
        b = jnp.asarray(rng.normal(size=shape[-1:]))
        w = jnp.asarray(rng.normal(size=shape))
        red = tuple(range(len(shape) - 1))
        ours, ref = _loss_pair(red)

        def scalar(f):
            return lambda x, g, b: jnp.sum(jnp.sin(f(x, g, b)) * w)

        # Jitted: one compile per derivative instead of one per primitive.
        for a, r in zip(
            jax.jit(jax.grad(scalar(ours), (0, 1, 2)))(x, g, b),
            jax.jit(jax.grad(scalar(ref), (0, 1, 2)))(x, g, b),
            strict=True,
        ):
            np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-10)
        for argnum in (0, 1):
            h = jax.jit(jax.hessian(scalar(ours), argnum))(x, g, b)
            h_ref = jax.jit(jax.hessian(scalar(ref), argnum))(x, g, b)
            np.testing.assert_allclose(h, h_ref, rtol=1e-9, atol=1e-9)
        t = jnp.asarray(rng.normal(size=shape))
        np.testing.assert_allclose(
            jax.jit(lambda x, t: jax.jvp(lambda x: ours(x, g, b), (x,), (t,))[1])(x, t),
            jax.jit(lambda x, t: jax.jvp(lambda x: ref(x, g, b), (x,), (t,))[1])(x, t),
            rtol=1e-10,
            atol=1e-10,
        )


def test_masked_gradients_match_autodiff_on_the_valid_subset_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        x = jnp.asarray(rng.normal(size=(10, 3)))
        mask = jnp.asarray(rng.random((10, 1)) > 0.4)
        g, b = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.1, 0.0, -0.3])

        def ours(x):
            y, _ = jbn.batch_norm(
                x, {"scale": g, "bias": b}, jbn.init_batch_stats(3), training=True, mask=mask
            )
            return jnp.sum(jnp.where(mask, jnp.sin(y), 0.0))

        def ref(x):
            m = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
            n = m.sum(0, keepdims=True)
            mean = (m * x).sum(0, keepdims=True) / n
            var = (m * (x - mean) ** 2).sum(0, keepdims=True) / n
            y = (x - mean) / jnp.sqrt(var + EPS) * g[None] + b[None]
            return jnp.sum(jnp.where(mask, jnp.sin(y), 0.0))

        grad, hessian = jax.jit(jax.grad(ours)), jax.jit(jax.hessian(ours))
        np.testing.assert_allclose(grad(x), jax.jit(jax.grad(ref))(x), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(hessian(x), jax.jit(jax.hessian(ref))(x), rtol=1e-8, atol=1e-10)


def test_mask_counts_only_valid_elements():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(12, 5, 3)).astype(np.float32)
    x[::3] = 1e6  # garbage in the padded rows must not leak into the statistics
    mask = np.ones((12, 1, 1), bool)
    mask[::3] = False
    y, stats = jbn.batch_norm(
        x, None, jbn.init_batch_stats(3), training=True, mask=mask, momentum=0.0
    )
    y_sub, stats_sub = jbn.batch_norm(
        x[mask[:, 0, 0]], None, jbn.init_batch_stats(3), training=True, momentum=0.0
    )
    np.testing.assert_allclose(y[mask[:, 0, 0]], y_sub, atol=1e-5)
    np.testing.assert_allclose(stats["var"], stats_sub["var"], rtol=1e-5)
    # Per-element (feature-dependent) masks: counts differ per feature.
    mask2 = rng.random(x.shape) > 0.5
    _, m2 = jbn.batch_norm(
        x[:6], None, jbn.init_batch_stats(3), training=True, mask=mask2[:6], momentum=0.0
    )
    ref = np_batch_norm(x[:6], 1.0, 0.0, (2,), mask=mask2[:6])
    np.testing.assert_allclose(m2["mean"], ref[1], rtol=1e-5)
    np.testing.assert_allclose(m2["var"], ref[2], rtol=1e-5)


def test_a_feature_with_no_valid_element_keeps_its_running_stats():
    x = np.random.default_rng(10).normal(size=(8, 2)).astype(np.float32)
    mask = np.zeros((8, 2), bool)
    mask[:, 0] = True
    stats = {"mean": jnp.array([5.0, 7.0]), "var": jnp.array([2.0, 3.0])}
    _, new = jbn.batch_norm(x, None, stats, training=True, mask=mask, momentum=0.5)
    assert float(new["mean"][1]) == 7.0 and float(new["var"][1]) == 3.0
    assert np.isfinite(np.asarray(new["mean"])).all() and float(new["mean"][0]) != 5.0


def test_unbiased_running_var():
    x = np.random.default_rng(11).normal(size=(5, 2)).astype(np.float32)
    _, new = jbn.batch_norm(
        x, None, jbn.init_batch_stats(2), training=True, momentum=0.0, unbiased_running_var=True
    )
    np.testing.assert_allclose(new["var"], x.astype(np.float64).var(0, ddof=1), rtol=1e-5)


def test_ghost_batches_equal_their_definition():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(12, 4, 3)).astype(np.float32)
    y, new = jbn.batch_norm(
        x, None, jbn.init_batch_stats(3), training=True, momentum=0.0, virtual_batch_size=4
    )
    groups = x.reshape(3, 4, 4, 3).astype(np.float64)
    mean = groups.mean((1, 2), keepdims=True)
    var = groups.var((1, 2), keepdims=True)
    np.testing.assert_allclose(
        y, ((groups - mean) / np.sqrt(var + EPS)).reshape(x.shape), atol=1e-5
    )
    np.testing.assert_allclose(new["mean"], mean.mean((0, 1, 2)).ravel(), atol=1e-6)
    np.testing.assert_allclose(new["var"], var.mean((0, 1, 2)).ravel(), rtol=1e-5)


def test_forward_under_jit_vmap_scan_checkpoint():
    rng = np.random.default_rng(13)
    xs = jnp.asarray(rng.normal(size=(3, 8, 4)).astype(np.float32))
    params, stats = jbn.init_params(4), jbn.init_batch_stats(4)

    def step(stats, x):
        y, stats = jbn.batch_norm(x, params, stats, training=True, momentum=0.5)
        return stats, y

    final, ys = jax.lax.scan(jax.checkpoint(step), stats, xs)
    s, y_loop = stats, []
    for x in xs:
        s, y = step(s, x)
        y_loop.append(y)
    np.testing.assert_allclose(ys, np.stack(y_loop), atol=1e-6)
    np.testing.assert_allclose(final["var"], s["var"], rtol=1e-6)
    y_vmap, _ = jax.vmap(lambda x: jbn.batch_norm(x, params, stats, training=True))(xs)
    np.testing.assert_allclose(y_vmap, np.stack(y_loop), atol=1e-6)
    y_jit, _ = jax.jit(lambda x: jbn.batch_norm(x, params, stats, training=True))(xs[0])
    np.testing.assert_allclose(y_jit, y_loop[0], atol=1e-6)
    # Gradients under each: test_gradients_under_transformations_match_float64_plain_autodiff.


def _transformed_losses(batch_norm):
    """Losses of (xs, scale, bias), one per transformation, all built on ``batch_norm``."""

    def bn(x, g, b):
        return batch_norm(x, g, b)

    def single(x, g, b, w):
        return jnp.sum(jnp.sin(bn(x, g, b)) * w)

    def recurrent(xs, g, b, ws):  # BatchNorm applied to its own output, step after step
        def step(h, xw):
            x, w = xw
            h = jnp.tanh(bn(h + x, g, b))
            return h, jnp.sum(h * w)

        return jnp.sum(jax.lax.scan(step, jnp.zeros_like(xs[0]), (xs, ws))[1])

    def looped(xs, g, b, ws):  # the same recurrence, unrolled in Python
        h, total = jnp.zeros_like(xs[0]), 0.0
        for x, w in zip(xs, ws, strict=True):
            h = jnp.tanh(bn(h + x, g, b))
            total = total + jnp.sum(h * w)
        return total

    return {
        "jit": (jax.jit(single), single),
        "checkpoint": (  # Only the BatchNorm call rematerialized.
            lambda x, g, b, w: jnp.sum(jnp.sin(jax.checkpoint(bn)(x, g, b)) * w),
            single,
        ),
        "remat": (jax.checkpoint(single), single),
        "vmap": (
            lambda xs, g, b, ws: jnp.sum(jax.vmap(single, (0, None, None, 0))(xs, g, b, ws)),
            lambda xs, g, b, ws: sum(single(x, g, b, w) for x, w in zip(xs, ws, strict=True)),
        ),
        "scan": (recurrent, looped),
    }


@pytest.mark.parametrize("transform", ["jit", "checkpoint", "remat", "vmap", "scan"])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
def test_gradients_under_transformations_match_float64_plain_autodiff(transform, dtype, tol):
    rng = np.random.default_rng(17)
    stacked = transform in ("vmap", "scan")
    shape = (3, 8, 4) if stacked else (8, 4)
    x, w = rng.normal(1.0, 2.0, shape), rng.normal(size=shape)
    g, b = rng.normal(size=4), rng.normal(size=4)

    def ours(x, g, b):
        params = {"scale": g, "bias": b}
        return jbn.batch_norm(x, params, jbn.init_batch_stats(4, x.dtype), training=True)[0]

    def ref(x, g, b):
        return plain_batch_norm(x, g, b, (0,))

    with jax.enable_x64(True):
        transformed, _ = _transformed_losses(ours)[transform]
        _, untransformed = _transformed_losses(ref)[transform]
        args = [jnp.asarray(a, dtype) for a in (x, g, b, w)]
        grads = jax.jit(jax.grad(transformed, (0, 1, 2)))(*args)
        grads_ref = jax.jit(jax.grad(untransformed, (0, 1, 2)))(
            *[jnp.asarray(a, np.float64) for a in (x, g, b, w)]
        )
        for got, want in zip(grads, grads_ref, strict=True):
            assert got.dtype == dtype
            scale = float(jnp.max(jnp.abs(want)))
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def test_vmap_axis_name_equals_the_global_batch():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(4, 6, 3)).astype(np.float32)
    mask = rng.random((4, 6, 1)) > 0.3
    params, stats = jbn.init_params(3), jbn.init_batch_stats(3)
    y, new = jax.vmap(
        lambda x, m: jbn.batch_norm(x, params, stats, training=True, axis_name="batch", mask=m),
        axis_name="batch",
    )(x, mask)
    y_ref, new_ref = jbn.batch_norm(
        x.reshape(24, 3), params, stats, training=True, mask=mask.reshape(24, 1)
    )
    np.testing.assert_allclose(y.reshape(24, 3), y_ref, atol=1e-5)
    np.testing.assert_allclose(new["var"][0], new_ref["var"], rtol=1e-6)


@pytest.mark.parametrize(
    "shape,kwargs",
    [
        ((64, 8, 8, 32), dict()),
        ((64, 32, 8, 8), dict(axis=1)),
        ((4096, 32), dict()),
        ((64, 8, 8, 32), dict(virtual_batch_size=16)),
    ],
)
def test_x_minus_mean_is_never_written_to_memory(shape, kwargs):
    # On XLA:CPU the statistics and the gradient's sums read x with x - mean
    # fused in: forward and forward+backward each write one full-size array,
    # their result (y, dx). When XLA's CSE merges two of the x - mean (or their
    # broadcast means), it writes that array to memory and reads it back (so
    # did the code before it wrote them apart, for all but NHWC). With a mask,
    # XLA:CPU writes the masked arrays (YNNPACK's reductions take no select).
    if jax.default_backend() != "cpu":
        pytest.skip("checks XLA:CPU's fusions")
    axis = kwargs.get("axis", -1)
    x = jnp.asarray(np.random.default_rng(17).normal(size=shape), jnp.float32)
    params, stats = jbn.init_params(shape[axis]), jbn.init_batch_stats(shape[axis])

    def forward(x, params):
        return jbn.batch_norm(x, params, stats, training=True, **kwargs)

    def forward_backward(x, params, dy):
        (y, new_stats), vjp = jax.vjp(forward, x, params)
        return vjp((dy, jax.tree.map(jnp.zeros_like, new_stats)))

    assert len(full_size_fusions(forward, x, params, size=x.size)) == 1
    assert len(full_size_fusions(forward_backward, x, params, x, size=x.size)) == 1


def _full_size_residuals(f, x, *args):
    """(dtype, shape) of every residual of ``jax.vjp(f)`` with as many elements as ``x``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, x, *args)
    found = []
    for line in out.getvalue().splitlines():
        dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
        shape = tuple(int(d) for d in dims.split(",") if d)
        if np.prod(shape, dtype=int) >= x.size:  # any shape: reshaped copies count too
            found.append((dtype, shape))
    return found, out.getvalue()


@pytest.mark.parametrize(
    "shape,kwargs,dtype",
    [
        ((8, 6, 6, 4), dict(axis=-1), jnp.float32),
        ((8, 4, 6, 6), dict(axis=1), jnp.float32),
        ((8, 6, 6, 4), dict(virtual_batch_size=4), jnp.float32),
        ((8, 6, 6, 4), dict(), jnp.bfloat16),
    ],
)
def test_saves_one_full_size_residual_its_input(shape, kwargs, dtype):
    x = jnp.asarray(np.random.default_rng(15).normal(size=shape), dtype)
    axis = kwargs.get("axis", -1)

    def f(x, params):
        return jbn.batch_norm(
            x, params, jbn.init_batch_stats(x.shape[axis]), training=True, **kwargs
        )

    found, text = _full_size_residuals(f, x, jbn.init_params(shape[axis]))
    # One full-size array, x itself (in the input dtype), before and after any reshape.
    assert [dtype for dtype, _ in found] == [{jnp.float32: "f32", jnp.bfloat16: "bf16"}[dtype]], (
        text
    )


def test_with_a_mask_the_residuals_are_the_input_and_the_boolean_mask():
    rng = np.random.default_rng(16)
    x = jnp.asarray(rng.normal(size=(8, 6, 6, 4)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 6, 6, 1)) > 0.3)

    def f(x, params):
        return jbn.batch_norm(x, params, jbn.init_batch_stats(4), training=True, mask=mask)

    found, text = _full_size_residuals(f, x, jbn.init_params(4))
    assert sorted(found) == [("bool", x.shape), ("f32", x.shape)], text


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (
            dict(x=jnp.ones((1, 3))),
            ValueError,
            r"Expected more than 1 value per feature when training, got input of shape \(1, 3\)",
        ),
        (dict(x=jnp.ones((0, 3))), ValueError, r"batch_norm got an empty input of shape \(0, 3\)"),
        (
            dict(x=jnp.ones((4, 5))),
            ValueError,
            r"params\['scale'\] has shape \(3,\) but the input has \(5,\) features",
        ),
        (
            dict(x=jnp.ones((4, 3), jnp.int32)),
            TypeError,
            r"batch_norm expects a floating-point input, got dtype int32",
        ),
        (dict(epsilon=0.0), ValueError, r"epsilon must be positive and finite, got 0.0"),
        (dict(epsilon=float("nan")), ValueError, r"epsilon must be positive and finite, got nan"),
        (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
        (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\]"),
        (
            dict(mask=jnp.ones((3, 3), bool)),
            ValueError,
            r"mask of shape \(3, 3\) is not broadcastable to the input shape \(4, 3\)",
        ),
        (dict(axis=2), ValueError, r"axis 2 is out of range for an input of rank 2"),
        (
            dict(virtual_batch_size=3),
            ValueError,
            r"virtual_batch_size=3 must be positive and divide the batch size 4",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, exc, message):
    args = dict(x=jnp.ones((4, 3)), momentum=0.9, epsilon=1e-5)
    args.update(kwargs)
    x = args.pop("x")
    with pytest.raises(exc, match=message):
        jbn.batch_norm(x, jbn.init_params(3), jbn.init_batch_stats(3), training=True, **args)


def test_stats_of_wrong_size_are_rejected_in_inference_too():
    with pytest.raises(
        ValueError, match=r"stats\['mean'\] has shape \(4,\) but the input has \(3,\) features"
    ):
        jbn.batch_norm(jnp.ones((4, 3)), None, jbn.init_batch_stats(4), training=False)
