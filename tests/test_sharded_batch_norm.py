"""jbn.batch_norm with axis_name under shard_map equals the global computation.

Runs on 8 fake CPU devices (tests/conftest.py). Tolerance: 1e-5 (float32).
"""

import functools
import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from bn_reference import documented_variance_bound
from compiled_hlo import full_size_fusions
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jbn

TOL = 1e-5


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.fail("tests/conftest.py should have set 8 fake CPU devices")
    return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


def _sharded_bn(mesh, **kwargs):
    def f(x, mask, params, stats):
        return jbn.batch_norm(
            x, params, stats, training=True, axis_name="data", mask=mask, **kwargs
        )

    return jax.jit(
        jax.shard_map(
            f, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()), out_specs=(P("data"), P())
        )
    )


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, shape).astype(np.float32)
    params = {
        "scale": rng.normal(size=shape[-1:]).astype(np.float32),
        "bias": rng.normal(size=shape[-1:]).astype(np.float32),
    }
    return x, params, jbn.init_batch_stats(shape[-1])


def test_shard_map_equals_global_batch(mesh):
    x, params, stats = _data((32, 4, 4, 3))
    y, new = _sharded_bn(mesh, momentum=0.9)(x, np.ones((32, 1, 1, 1), bool), params, stats)
    y_ref, new_ref = jbn.batch_norm(x, params, stats, training=True, momentum=0.9)
    np.testing.assert_allclose(y, y_ref, atol=TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL), new, new_ref)


def test_masks_with_unequal_valid_counts_per_device(mesh):
    x, params, stats = _data((32, 5, 3), seed=1)
    mask = np.ones((32, 5, 1), bool)
    mask[:4] = False  # device 0: nothing valid
    mask[4:8, 2:] = False  # device 1: partly valid
    mask[-3:] = False  # device 7: one valid row
    x[~np.broadcast_to(mask, x.shape)] = 1e6  # padding garbage must not leak
    y, new = _sharded_bn(mesh, momentum=0.5, unbiased_running_var=True)(x, mask, params, stats)
    y_ref, new_ref = jbn.batch_norm(
        x, params, stats, training=True, momentum=0.5, unbiased_running_var=True, mask=mask
    )
    valid = np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_ref)[valid], atol=TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL), new, new_ref)
    # And against float64 NumPy on the valid elements only.
    xv = x.reshape(-1, 3)[np.broadcast_to(mask, x.shape).reshape(-1, 3)[:, 0]].astype(np.float64)
    np.testing.assert_allclose(new["mean"], 0.5 * xv.mean(0), rtol=TOL)
    np.testing.assert_allclose(new["var"], 0.5 + 0.5 * xv.var(0, ddof=1), rtol=TOL)


COLLECTIVES = {"psum", "all_gather", "ppermute", "all_to_all", "reduce_scatter", "pmax", "pmin"}


def _jaxpr_collectives(jaxpr) -> list[str]:
    """Collective primitives in ``jaxpr`` and every nested jaxpr, in order.

    Counted in the jaxpr, before XLA combines independent all-reduces.
    """
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name.removesuffix("_invariant")
        if name in COLLECTIVES:
            found.append(name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _jaxpr_collectives(sub)
    return found


def test_gradients_match_global_and_use_one_collective_each_way(mesh):
    x, params, stats = _data((32, 6, 3), seed=2)
    mask = np.random.default_rng(3).random((32, 6, 1)) > 0.25
    w = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
    sharded = _sharded_bn(mesh)

    def loss(x, params):
        return jnp.sum(jnp.sin(sharded(x, mask, params, stats)[0]) * w)

    def loss_ref(x, params):
        return jnp.sum(jnp.sin(jbn.batch_norm(x, params, stats, training=True, mask=mask)[0]) * w)

    grads = jax.jit(jax.grad(loss, (0, 1)))(x, params)
    grads_ref = jax.grad(loss_ref, (0, 1))(x, params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL), grads, grads_ref
    )

    # Forward: the statistics take one collective, a psum that gathers every
    # device's moments (jbn.core.statistics.gather_with_psum), and nothing else.
    # Backward (its program also holds the forward): that psum and one more,
    # which carries BatchNorm's two sums and the parameters' gradients together.
    forward = jax.make_jaxpr(sharded)(x, mask, params, stats).jaxpr
    assert _jaxpr_collectives(forward) == ["psum"]
    backward = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, params).jaxpr
    assert _jaxpr_collectives(backward) == ["psum", "psum"]
    # And in the compiled programs (after XLA's own combining).
    collective = (
        r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\("
    )
    compiled = sharded.lower(x, mask, params, stats).compile().as_text()
    assert [m.group(1) for m in re.finditer(collective, compiled)] == ["all-reduce"]
    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(x, params).compile().as_text()
    assert [m.group(1) for m in re.finditer(collective, compiled)] == ["all-reduce", "all-reduce"]


def test_axis_index_groups(mesh):
    x, params, stats = _data((32, 3), seed=5)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def f(x):
        return jbn.batch_norm(
            x, params, stats, training=True, axis_name="data", axis_index_groups=groups
        )[0]

    y = jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)
    )(x)
    y_ref = np.concatenate(
        [
            jbn.batch_norm(x[:16], params, stats, training=True)[0],
            jbn.batch_norm(x[16:], params, stats, training=True)[0],
        ]
    )
    np.testing.assert_allclose(y, y_ref, atol=TOL)


def test_plain_jit_with_a_sharded_batch_needs_no_axis_name(mesh):
    x, params, stats = _data((64, 4, 4, 3), seed=6)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    y, new = jax.jit(lambda x: jbn.batch_norm(x, params, stats, training=True))(xs)
    y_ref, new_ref = jbn.batch_norm(x, params, stats, training=True)
    np.testing.assert_allclose(y, y_ref, atol=TOL)
    np.testing.assert_allclose(new["var"], new_ref["var"], rtol=TOL)


@pytest.fixture(scope="module")
def sharded_moments(mesh):
    return jax.jit(
        jax.shard_map(
            lambda x: jbn.moments(x, axis_name="data"), mesh=mesh, in_specs=P("data"), out_specs=P()
        )
    )


@pytest.mark.parametrize("seed", range(8))
def test_merged_variance_is_accurate_when_mean_dominates(sharded_moments, seed):
    # mean / std = 1e4 in float32, as test_statistics checks on one device:
    # through the merge of 8 devices' moments the variance stays within 1e-5
    # (measured: at most 3.2e-6 over 20 seeds; 1.5e-5 without the deviation sums).
    x = np.random.default_rng(100 + seed).normal(1e4, 1.0, (256, 8, 8, 4)).astype(np.float32)
    true = np.asarray(x, np.float64)
    moments = sharded_moments(x)
    # The mean within 3 float32 ulps at 1e4 (measured: 2; one device: 1).
    np.testing.assert_allclose(moments.mean, true.mean((0, 1, 2)), rtol=3e-7)
    np.testing.assert_array_less(np.abs(moments.var / true.var((0, 1, 2)) - 1), 1e-5)


def test_merged_variance_with_masks_is_accurate_when_mean_dominates(mesh):
    rng = np.random.default_rng(7)
    x = rng.normal(1e4, 1.0, (64, 16, 4)).astype(np.float32)
    mask = rng.random((64, 16, 1)) > 0.3
    mask[:8] = False  # device 0 holds nothing valid
    y, new = _sharded_bn(mesh, momentum=0.0)(x, mask, None, jbn.init_batch_stats(4))
    valid = np.asarray(x, np.float64)[np.broadcast_to(mask, x.shape)].reshape(-1, 4)
    np.testing.assert_array_less(np.abs(new["var"] / valid.var(0) - 1), 1e-5)


def test_gather_with_psum_equals_all_gather(mesh):
    # The merge's gather: every device's values in index order, exactly (the
    # other slots add zeros), with a single psum; per group with axis_index_groups.
    from jbn.core.statistics import gather_with_psum

    x = np.random.default_rng(9).normal(size=(8, 2, 3)).astype(np.float32)
    x[3, 0, 0] = np.nan  # stays in its own slot

    def both(x, groups=None):
        ours = gather_with_psum(x[0], "data", groups)
        theirs = jax.lax.all_gather(x[0], "data", axis_index_groups=groups)
        return ours[None], theirs[None]

    def run(groups):
        f = jax.shard_map(
            functools.partial(both, groups=groups),
            mesh=mesh,
            in_specs=P("data"),
            out_specs=P("data"),
            check_vma=False,
        )
        return jax.jit(f)(x)

    ours, theirs = run(None)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours[5], x)
    ours, theirs = run([[0, 2, 4, 6], [1, 3, 5, 7]])
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours[1], x[[1, 3, 5, 7]])
    # Over two nested vmap axes, where all_gather fails: the flattened devices.
    nested = jax.vmap(
        jax.vmap(lambda v: gather_with_psum(v, ("outer", "inner"), None), axis_name="inner"),
        axis_name="outer",
    )(x.reshape(2, 4, 2, 3))
    np.testing.assert_array_equal(nested[1, 2], x)


def test_the_merge_writes_no_centred_copy(mesh):
    # The merged statistics read each device's x with x - mean fused into the
    # reductions (tests/test_full_size_arrays.py checks one device): per device,
    # forward and forward+backward write one full-size array, y and dx.
    if jax.default_backend() != "cpu":
        pytest.skip("checks XLA:CPU's fusions")
    x, params, stats = _data((64, 8, 8, 32), seed=10)
    sharded = jax.shard_map(
        lambda x, params: jbn.batch_norm(x, params, stats, training=True, axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=(P("data"), P()),
    )

    def forward_backward(x, params, dy):
        (y, new_stats), vjp = jax.vjp(sharded, x, params)
        return vjp((dy, jax.tree.map(jnp.zeros_like, new_stats)))

    per_device = x.size // 8
    assert len(full_size_fusions(sharded, x, params, size=per_device)) == 1
    assert len(full_size_fusions(forward_backward, x, params, x, size=per_device)) == 1


@pytest.mark.parametrize("mean_over_std", [0.0, 1e3, 3e4, 1e5])
@pytest.mark.parametrize("masked", [False, True])
def test_merged_variance_within_the_documented_bound(mesh, mean_over_std, masked):
    # As tests/test_statistics.py checks one device: the 8-device merge
    # (count-weighted, with the deviation sums) keeps the same float32 bound.
    rng = np.random.default_rng(int(mean_over_std) + 11)
    x = rng.normal(mean_over_std * 0.5, 0.5, (64, 8, 8, 3)).astype(np.float32)
    mask = rng.random((64, 8, 8, 1)) > 0.4 if masked else np.ones((64, 8, 8, 1), bool)
    mask[:8] = False  # one device holds nothing valid
    merged = jax.jit(
        jax.shard_map(
            lambda x, mask: jbn.moments(x, mask=mask, axis_name="data"),
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=P(),
        )
    )(x, mask)
    valid = np.asarray(x, np.float64)[np.broadcast_to(mask, x.shape)].reshape(-1, 3)
    error = np.max(np.abs(np.asarray(merged.var, np.float64) / valid.var(0) - 1))
    assert error <= documented_variance_bound(mean_over_std), error
    np.testing.assert_allclose(merged.mean, valid.mean(0), rtol=3e-7, atol=1e-6)
