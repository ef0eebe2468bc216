"""Forward BatchNorm of the functional core against float64 NumPy references.

Checks training and inference outputs and running statistics (any layout and
feature axes, no affine parameters, cumulative average with momentum=None,
unbiased running variance, half-precision inputs, masks and ghost batches)
against float64 NumPy (``bn_reference.np_batch_norm``, the reference notebook's
NumPy class, or the definition written out), and that bad input raises an error
naming the problem. Tolerances: float32 outputs 1e-5 and running statistics 1e-6
absolute or 1e-5 relative; bfloat16/float16 outputs 2e-2.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from bn_reference import EPS, np_batch_norm

import jbn
from jbn.core import validation

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
