"""Independent references for the functional core's tests (a helper of the tests).

``np_batch_norm`` computes BatchNorm in float64 NumPy, ``plain_batch_norm`` with
plain JAX autodiff (two passes, no custom derivative), both with epsilon ``EPS``;
``documented_variance_bound`` is the float32 variance error bound that
jbn.core.statistics documents, with a 2x margin.
"""

import jax.numpy as jnp
import numpy as np

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


def documented_variance_bound(mean_over_std):
    """jbn.core.statistics' float32 bound, ``(1.2e-7 |mean| / std)**2 + 2e-7``, with 2x margin."""
    return 2 * ((1.2e-7 * mean_over_std) ** 2 + 2e-7)
