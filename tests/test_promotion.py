"""jbn under the promotion settings careful JAX codebases turn on, and its complex refusal.

``jax_numpy_rank_promotion="raise"`` (Equinox's test suite runs with it) and
``jax_numpy_dtype_promotion="strict"``: the functional core (training mode and
its gradient), ``jbn.BatchNorm``, ``jbn.nnx.BatchNorm`` and ``jbn.BatchRenorm``
run under both, bfloat16 inputs included (float32 statistics). The whole
BatchNorm suite also runs under them with ``pytest --strict-promotion``
(tests/run_modes.py). Tolerance: 1e-6 against the same call with JAX's default
promotion (bfloat16 outputs: exactly equal).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from run_modes import standard_promotion

import jbn
import jbn.nnx


def _strict():
    return jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict")


def _functional(x):
    params, stats = jbn.init_params(x.shape[-1]), jbn.init_batch_stats(x.shape[-1])

    def loss(x, params):
        y, new_stats = jbn.batch_norm(x, params, stats, training=True, momentum=0.9)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), new_stats

    (value, new_stats), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
    y_eval, _ = jbn.batch_norm(x, params, new_stats, training=False)
    return value, new_stats, grads, y_eval


def _linen(module):
    def run(x):
        variables = module.init(jax.random.key(0), x)
        y, updates = module.apply(variables, x, mutable=["batch_stats"])
        grads = jax.grad(
            lambda p: jnp.sum(
                module.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0].astype(
                    jnp.float32
                )
                ** 2
            )
        )(variables["params"])
        return y, updates, grads

    return run


def _nnx(x):
    layer = jbn.nnx.BatchNorm(x.shape[-1], momentum=0.9, rngs=nnx.Rngs(0))
    y = layer(x)
    layer.eval()
    return y, layer.mean[...], layer.var[...], layer(x)


CASES = {
    "batch_norm": _functional,
    "BatchNorm": _linen(jbn.BatchNorm(use_running_average=False)),
    "BatchNorm ghost, NCHW": _linen(
        jbn.BatchNorm(use_running_average=False, axis=1, virtual_batch_size=4)
    ),
    "BatchRenorm": _linen(jbn.BatchRenorm(use_running_average=False, r_max=1.5, d_max=0.5)),
    "nnx.BatchNorm": _nnx,
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_runs_under_strict_promotion_as_under_the_default(case, dtype):
    x = (jax.random.normal(jax.random.key(1), (8, 6, 6, 4)) * 2 + 1).astype(dtype)
    # Jitted (one compile each): the promotion settings are part of the trace context.
    expected = jax.jit(CASES[case])(x)
    rank, dtypes = _strict()
    with rank, dtypes:
        got = jax.jit(CASES[case])(x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), 1e-6, 1e-6)
    if dtype == jnp.bfloat16:  # the statistics stay float32
        stats = [a for a in jax.tree.leaves(got) if a.ndim == 1 and a.shape[0] in (4, 6)]
        assert stats and all(a.dtype == jnp.float32 for a in stats)


def test_complex_inputs_are_refused_where_flax_normalizes_them():
    parts = jax.random.normal(jax.random.key(2), (2, 16, 3))
    x = jax.lax.complex(parts[0], 2 * parts[1] + 1)
    flax_bn = nn.BatchNorm(use_running_average=False, dtype=jnp.complex64)
    with standard_promotion():  # flax, the reference, even in the strict pass
        y, _ = flax_bn.apply(flax_bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    assert y.dtype == jnp.complex64  # flax's semantics, which jbn does not offer
    message = r"expects a real floating-point input, got dtype complex64: complex inputs"
    with pytest.raises(TypeError, match=message):
        jbn.batch_norm(x, None, jbn.init_batch_stats(3), training=True)
    with pytest.raises(TypeError, match=message):
        jbn.moments(x)
    with pytest.raises(TypeError, match=message):
        jbn.BatchNorm(use_running_average=False, dtype=jnp.complex64).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=message):
        jbn.BatchRenorm(use_running_average=False).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=message):
        jbn.nnx.BatchNorm(3, use_running_average=False, rngs=nnx.Rngs(0))(x)
