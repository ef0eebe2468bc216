"""Ghost BatchNorm: jbn.BatchNorm(virtual_batch_size=...) against its definition by hand."""

import jax
import numpy as np
import pytest

import jbn

ATOL = 1e-5


def _reference(x, scale, bias, mean, var, group, momentum, eps, unbiased):
    """Hoffer et al. (2017): each group of `group` rows normalized on its own, float64."""
    x = np.asarray(x, np.float64)
    groups = x.reshape(-1, group, *x.shape[1:])
    axes = tuple(range(1, groups.ndim - 1))
    mu = groups.mean(axes, keepdims=True)
    sigma2 = groups.var(axes, keepdims=True)
    y = (scale * (groups - mu) / np.sqrt(sigma2 + eps) + bias).reshape(x.shape)
    batch_mean = mu.reshape(len(groups), -1).mean(0)
    batch_var = sigma2.reshape(len(groups), -1).mean(0)
    if unbiased:
        n = groups[0].size // groups.shape[-1]
        batch_var = batch_var * n / (n - 1)
    return (
        y,
        momentum * mean + (1 - momentum) * batch_mean,
        momentum * var + (1 - momentum) * batch_var,
    )


@pytest.mark.parametrize(
    "shape,group,unbiased", [((12, 5), 4, False), ((8, 3, 3, 2), 2, True), ((6, 4), 6, False)]
)
def test_module_matches_definition(shape, group, unbiased):
    x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
    module = jbn.BatchNorm(
        momentum=0.9, epsilon=1e-3, virtual_batch_size=group, unbiased_running_var=unbiased
    )
    variables = module.init(jax.random.key(1), x, use_running_average=False)
    n = shape[-1]
    params = {"scale": np.linspace(0.5, 1.5, n), "bias": np.linspace(-0.2, 0.3, n)}
    stats = {"mean": np.linspace(-1, 1, n), "var": np.linspace(0.5, 2, n)}
    variables = {
        "params": jax.tree.map(lambda a: a.astype(np.float32), params),
        "batch_stats": jax.tree.map(lambda a: a.astype(np.float32), stats),
    }
    y, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    y_ref, mean_ref, var_ref = _reference(
        x, params["scale"], params["bias"], stats["mean"], stats["var"], group, 0.9, 1e-3, unbiased
    )
    np.testing.assert_allclose(y, y_ref, atol=ATOL)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], mean_ref, atol=ATOL)
    np.testing.assert_allclose(updates["batch_stats"]["var"], var_ref, atol=ATOL)
    # Eval mode ignores the groups: plain normalization with the running statistics.
    y_eval = module.apply(variables, x, use_running_average=True)
    x = np.asarray(x)  # the reference in NumPy
    expected = params["scale"] * (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-3) + params["bias"]
    np.testing.assert_allclose(y_eval, expected, atol=ATOL)


def test_group_size_must_divide_batch():
    module = jbn.BatchNorm(use_running_average=False, virtual_batch_size=5)
    with pytest.raises(ValueError, match="must be positive and divide the batch size 12"):
        module.init(jax.random.key(0), np.zeros((12, 3), np.float32))
