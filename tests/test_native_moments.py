"""Tests for jbn.native.moments (BatchNorm's statistics in one read, a compiled CPU kernel).

References: float64 NumPy sums around the kernel's own float32 mean (what the
kernel computes) and around the exact mean, and jbn's XLA path. Tolerances:
``m2`` within 2e-6 relative of the float64 sum around the float32 mean, at
mean/std from 0 to 1e5 and wherever the pivot lands (measured up to 2.7e-7 on
random data, 5.5e-7 on the adversarial input below; the documented bound for
any input is about 5e-6, approached only by inputs built for it);
the mean within one float32 rounding of the exact one; the tangents within
1e-5 of the XLA path's.

The kernel is built with the C++ compiler; where there is none, these tests
skip. Where there is one, a failed build fails them.
"""

import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import python_output_on_one_device
from jax.sharding import PartitionSpec as P

import jbn
from jbn.core import statistics
from jbn.native import moments as native_moments
from jbn.train import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]

# These check what happens on the CPU; on other platforms the XLA path runs.
on_cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU lowering")


@pytest.fixture(scope="module", autouse=True)
def built():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler: jbn.native.moments uses XLA's reductions instead")
    assert native_moments.available(), "a C++ compiler is present but the kernel did not build"


def _float64_moments(x):
    """Mean, and sums of squared deviations around the float32 mean and around the exact one."""
    x = np.asarray(x)
    x64 = x.astype(np.float64)
    exact = x64.mean(-2)
    around_exact = np.sum((x64 - exact[..., None, :]) ** 2, -2)
    return exact, around_exact


def _relative(a, b):
    return np.max(np.abs(np.asarray(a, np.float64) - b) / np.maximum(np.abs(b), 1e-300))


def _data(shape, offset, seed=0, scale=3.0):
    return jax.random.normal(jax.random.key(seed), shape) * scale + offset * scale


@pytest.mark.parametrize(
    "shape", [(1, 4096, 16), (2, 3000, 24), (1, 777, 3), (3, 50, 64), (1, 5, 1)]
)
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e5])
def test_matches_float64_at_any_offset(shape, offset):
    x = _data(shape, offset)
    mean, m2, deviation_sum = jax.jit(native_moments.moments)(x)
    x64 = np.asarray(x, np.float64)
    exact_mean, _ = _float64_moments(x)
    # The float32 mean: within one rounding of the exact one.
    assert np.all(
        np.abs(np.asarray(mean, np.float64) - exact_mean) <= 1.2e-7 * np.abs(exact_mean) + 1e-6
    )
    # m2 and deviation_sum around that float32 mean, as the kernel defines them.
    centred = x64 - np.asarray(mean, np.float64)[..., None, :]
    around_float_mean = np.sum(centred**2, -2)
    assert _relative(m2, around_float_mean) <= 2e-6
    spread = np.sqrt(shape[-2] * around_float_mean)
    assert np.all(np.abs(np.asarray(deviation_sum, np.float64) - centred.sum(-2)) <= 2e-6 * spread)


def test_variance_within_the_documented_bound_of_the_exact_one():
    # statistics' docstring: about (1.2e-7 |mean| / std)**2 + 2e-7 relative, as the two passes.
    for offset in [0.0, 1e2, 1e3, 1e4]:
        x = _data((1, 256 * 64, 8), offset, seed=1, scale=1.0)
        _, m2, _ = native_moments.moments(x)
        _, exact = _float64_moments(x)
        bound = (1.2e-7 * offset) ** 2 + 2e-7
        assert _relative(m2, exact) <= 3 * bound, offset


def test_a_far_pivot_is_read_again_around_the_mean():
    # The 32 rows the pivot averages (row i * R / 32) are 3000.3 above the
    # others, which are all equal: every shifted square rounds the same way in
    # float32, so without the second read m2 was off by 1.6e-3 (measured with
    # the read disabled; 9.9e-5 with 4096 rows). With it: 5.5e-7.
    rows, pivot_rows = 1 << 16, 32
    x = np.full((1, rows, 8), 1.0, np.float32)
    x[0, [i * rows // pivot_rows for i in range(pivot_rows)], :] = np.float32(3001.3)
    mean, m2, _ = native_moments.moments(jnp.asarray(x))
    centred = x.astype(np.float64) - np.asarray(mean, np.float64)[:, None, :]
    assert _relative(m2, np.sum(centred**2, 1)) <= 2e-6


def test_a_group_read_again_leaves_the_other_groups_as_they_were():
    # Group 1 has the far pivot of the test above, groups 0 and 2 do not: each
    # group's results are those of the kernel on that group alone.
    rows = 1 << 12
    x = np.asarray(_data((3, rows, 8), 0.0, seed=5), np.float32).copy()
    x[1] = 1.0
    x[1, [i * rows // 32 for i in range(32)], :] = np.float32(3001.3)
    together = native_moments.moments(jnp.asarray(x))
    for g in range(3):
        alone = native_moments.moments(jnp.asarray(x[g : g + 1]))
        for got, want in zip(together, alone, strict=True):
            np.testing.assert_array_equal(got[g], want[0])


def test_constant_features_give_exactly_zero():
    x = jnp.broadcast_to(jnp.asarray([0.1, -3.0, 1e4, 0.0], jnp.float32), (2, 999, 4))
    mean, m2, deviation_sum = native_moments.moments(x)
    np.testing.assert_array_equal(mean, x[:, 0])
    np.testing.assert_array_equal(m2, np.zeros((2, 4)))
    np.testing.assert_array_equal(deviation_sum, np.zeros((2, 4)))


def test_nan_stays_in_its_feature():
    x = np.asarray(_data((1, 300, 3), 0.0), np.float32).copy()
    x[0, 123, 1] = np.nan
    mean, m2, _ = native_moments.moments(jnp.asarray(x))
    assert np.isnan(mean[0, 1]) and np.isnan(m2[0, 1])
    assert np.all(np.isfinite(np.asarray(mean)[0, [0, 2]]))
    assert np.all(np.asarray(m2)[0, [0, 2]] > 0)


def test_vmap_equals_one_call_per_slice():
    x = _data((3, 2, 500, 16), 10.0)
    mapped = jax.vmap(native_moments.moments)(x)
    for i in range(3):
        for got, want in zip(mapped, native_moments.moments(x[i]), strict=True):
            np.testing.assert_array_equal(got[i], want)


def test_tangents_match_the_xla_path():
    x = _data((2, 400, 8), 5.0)
    dx = jax.random.normal(jax.random.key(3), x.shape)
    _, native_tangents = jax.jvp(native_moments.moments, (x,), (dx,))
    _, xla_tangents = jax.jvp(native_moments.xla_moments, (x,), (dx,))
    for got, want in zip(native_tangents[:2], xla_tangents[:2], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    grad = jax.grad(lambda x: jnp.sum(native_moments.moments(x)[1]))(x)
    expected = jax.grad(lambda x: jnp.sum(native_moments.xla_moments(x)[1]))(x)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x", [jnp.ones((0, 4)), jnp.ones((8,)), jnp.ones((8, 4), jnp.bfloat16)])
def test_unsupported_input_is_rejected_with_a_clear_error(x):
    assert not native_moments.supports(x)
    with pytest.raises(ValueError, match="unsupported x"):
        native_moments.moments(x)


def _one_device_mesh():
    return jax.make_mesh((1,), ("one",), devices=jax.devices()[:1])


def _batch_norm_on_one_device(x, mask=None, axis=-1):
    """batch_norm inside shard_map over one device: x lies whole on it, as in a 1-device process."""
    params, stats = jbn.init_params(x.shape[axis]), jbn.init_batch_stats(x.shape[axis])

    def step(x):
        return jbn.batch_norm(x, params, stats, training=True, axis=axis, mask=mask)

    return jax.jit(jax.shard_map(step, mesh=_one_device_mesh(), in_specs=P(), out_specs=P()))


@on_cpu_only
@pytest.mark.parametrize(
    ("shape", "axis", "mask", "one_read"),
    [
        ((16, 8, 8, 32), -1, False, True),  # NHWC
        ((256, 24), -1, False, True),  # (N, C)
        ((16, 32, 8, 8), 1, False, False),  # NCHW: reduced axes not adjacent
        ((16, 8, 8, 32), -1, True, False),  # a mask: XLA's path
    ],
)
def test_batch_norm_uses_the_kernel_where_it_applies_with_the_same_results(
    shape, axis, mask, one_read
):
    x = _data(shape, 10.0)  # (far larger offsets: the test above)
    valid = None if not mask else jnp.arange(shape[0])[:, None, None, None] % 3 > 0
    on_one_device = _batch_norm_on_one_device(x, valid, axis)
    assert ("JbnMoments" in on_one_device.lower(x).as_text()) == one_read
    params, stats = jbn.init_params(x.shape[axis]), jbn.init_batch_stats(x.shape[axis])
    # Eight devices, x not placed on one: XLA's two passes.
    xla = jax.jit(lambda x: jbn.batch_norm(x, params, stats, training=True, axis=axis, mask=valid))
    assert "JbnMoments" not in xla.lower(x).as_text()
    (y, new_stats), (y_xla, stats_xla) = on_one_device(x), xla(x)
    np.testing.assert_allclose(y, y_xla, atol=2e-5)
    np.testing.assert_allclose(new_stats["mean"], stats_xla["mean"], rtol=1e-6)
    np.testing.assert_allclose(new_stats["var"], stats_xla["var"], rtol=1e-5)


@on_cpu_only
def test_gradients_through_batch_norm_match_the_xla_path():
    x = _data((8, 4, 4, 16), 2.0)
    params, stats = jbn.init_params(16), jbn.init_batch_stats(16)
    g = jax.random.normal(jax.random.key(4), x.shape)

    def loss(x, params):
        y, _ = jbn.batch_norm(x, params, stats, training=True)
        return jnp.vdot(y, g) + jnp.sum(y**3) / 100

    mesh = _one_device_mesh()
    native_grad = jax.jit(
        jax.shard_map(jax.grad(loss, (0, 1)), mesh=mesh, in_specs=(P(), P()), out_specs=P())
    )
    assert "JbnMoments" in native_grad.lower(x, params).as_text()
    for got, want in zip(
        jax.tree.leaves(native_grad(x, params)),
        jax.tree.leaves(jax.jit(jax.grad(loss, (0, 1)))(x, params)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Second order differentiates the jvp rule, the kernel's own jvp included.
    hvp = jax.jit(
        jax.shard_map(
            lambda x: jax.jvp(jax.grad(lambda x: loss(x, params)), (x,), (g,))[1],
            mesh=mesh,
            in_specs=P(),
            out_specs=P(),
        )
    )
    expected = jax.jvp(jax.grad(lambda x: loss(x, params)), (x,), (g,))[1]
    np.testing.assert_allclose(hvp(x), expected, rtol=1e-3, atol=1e-3)


@on_cpu_only
def test_a_sharded_jit_input_keeps_xla_reductions():
    # A custom call would make XLA gather the batch onto every device.
    mesh = distributed.create_mesh({"data": -1})
    x = jax.device_put(_data((16, 4, 4, 8), 0.0), distributed.batch_sharding(mesh))
    params, stats = jbn.init_params(8), jbn.init_batch_stats(8)
    step = jax.jit(lambda x: jbn.batch_norm(x, params, stats, training=True))
    assert "JbnMoments" not in step.lower(x).as_text()


@on_cpu_only
def test_a_batch_sharded_on_an_explicit_mesh_keeps_xla_reductions():
    # Decided from x's type before any reshape: reshaping a batch-sharded x to
    # (1, N*H*W, C) is refused on an explicit mesh.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    params, stats = jbn.init_params(8), jbn.init_batch_stats(8)
    with jax.set_mesh(mesh):
        x = jax.device_put(_data((16, 4, 4, 8), 3.0), P("data"))
        step = jax.jit(lambda x: jbn.batch_norm(x, params, stats, training=True))
        assert "JbnMoments" not in step.lower(x).as_text()
        y, new_stats = step(x)
    x64 = np.asarray(x, np.float64).reshape(-1, 8)
    np.testing.assert_allclose(new_stats["mean"], 0.01 * x64.mean(0), rtol=1e-5)
    expected = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), expected, atol=2e-5)


@on_cpu_only
def test_merged_across_devices_the_kernel_gives_the_two_pass_results():
    mesh = distributed.create_mesh({"data": -1})
    x = _data((64, 4, 4, 16), 1e4)

    def merged(x):
        return statistics.moments(x, axis_name="data")

    per_device = jax.jit(jax.shard_map(merged, mesh=mesh, in_specs=P("data"), out_specs=P()))
    assert "JbnMoments" in per_device.lower(x).as_text()
    got = per_device(x)
    x64 = np.asarray(x, np.float64).reshape(-1, 16)
    np.testing.assert_allclose(got.mean, x64.mean(0), rtol=1e-7)
    assert _relative(got.var, x64.var(0)) <= 3e-6


@on_cpu_only
def test_one_device_process_uses_the_kernel_with_the_same_bits_on_one_thread():
    # In a process with one device, jbn.batch_norm takes the kernel; pinned to
    # one CPU it gives the same bits as on several (fixed blocks, fixed order).
    code = (
        "import sys, jax, jbn\n"
        "x = jax.random.normal(jax.random.key(0), (64, 16, 16, 32)) * 3 + 1e3\n"
        "f = jax.jit(lambda x: jbn.moments(x))\n"
        "assert 'JbnMoments' in f.lower(x).as_text()\n"
        "m = f(x); sys.stdout.buffer.write(m.mean.tobytes() + m.var.tobytes())\n"
    )
    one_cpu = python_output_on_one_device(code, pinned_to_one_cpu=True)
    assert len(one_cpu) == 2 * 32 * 4
    assert one_cpu == python_output_on_one_device(code)


@on_cpu_only
def test_jax_export_of_a_training_step_needs_the_opt_out():
    # The custom call has no compatibility guarantee, so jax.export refuses it;
    # JBN_NO_NATIVE=1 exports XLA's reductions instead (README, guide).
    code = (
        "import jax, jax.numpy as jnp, jbn\n"
        "p, s = jbn.init_params(8), jbn.init_batch_stats(8)\n"
        "f = jax.jit(lambda x: jbn.batch_norm(x, p, s, training=True))\n"
        "try:\n"
        "    jax.export.export(f)(jnp.ones((4, 8)))\n"
        "    print('exported')\n"
        "except ValueError as error:\n"
        "    print('refused' if 'JbnMoments' in str(error) else error)\n"
    )
    assert python_output_on_one_device(code).split() == [b"refused"]
    opted_out = python_output_on_one_device(code, env={"JBN_NO_NATIVE": "1"})
    assert opted_out.split() == [b"exported"]
