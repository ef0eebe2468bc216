"""Fold inference-mode BatchNorm into the preceding convolution or dense layer.

In eval mode BatchNorm is the per-feature affine map
``y = s * (z - mean) + bias_bn`` with ``s = scale / sqrt(var + epsilon)``. When
``z = x @ kernel + b`` (a Dense layer, or a convolution: both keep the output
features on the kernel's last axis), the composition is one layer with
``kernel' = kernel * s`` and ``b' = s * (b - mean) + bias_bn``. The folded
network computes the same eval outputs without the normalization pass.

`fold_batch_norm` does it for a whole network: it traces one eval-mode call,
pairs each BatchNorm with the layer whose output it normalizes, and returns the
variables of the same network without norm layers (for the models of
`jbn.models`: ``use_batch_norm=False``, whose convolutions have a bias).

Example:
  >>> import jax.numpy as jnp
  >>> import jbn
  >>> from jbn.tools.folding import fold_into_dense
  >>> kernel, stats = jnp.ones((3, 2)), {"mean": jnp.ones(2), "var": jnp.full(2, 4.0)}
  >>> k, b = fold_into_dense(kernel, None, jbn.init_params(2), stats, epsilon=0.0)
  >>> k[0].tolist(), b.tolist()
  ([0.5, 0.5], [-0.5, -0.5])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jbn.tools.recalibration import is_batch_norm

__all__ = ["fold_batch_norm", "fold_into_conv", "fold_into_dense", "fold_small_bn_convnet"]

Array = jax.Array


def _fold(
    kernel: Array,
    bias: Array | None,
    bn_params: Mapping[str, Array] | None,
    bn_stats: Mapping[str, Array],
    epsilon: float,
) -> tuple[Array, Array]:
    kernel = jnp.asarray(kernel)
    features = kernel.shape[-1]
    mean = jnp.asarray(bn_stats["mean"], jnp.float32)
    var = jnp.asarray(bn_stats["var"], jnp.float32)
    if mean.shape != (features,) or var.shape != (features,):
        raise ValueError(
            f"BatchNorm statistics of shape {mean.shape}/{var.shape} do not match the "
            f"{features} output features of a kernel of shape {kernel.shape}"
        )
    bn_params = bn_params or {}
    multiplier = jax.lax.rsqrt(var + epsilon)
    if "scale" in bn_params:
        multiplier = multiplier * bn_params["scale"]
    offset = -mean * multiplier
    if bias is not None:
        offset = offset + multiplier * bias
    if "bias" in bn_params:
        offset = offset + bn_params["bias"]
    return (kernel * multiplier).astype(kernel.dtype), offset.astype(kernel.dtype)


def fold_into_conv(
    kernel: Array,
    bias: Array | None,
    bn_params: Mapping[str, Array] | None,
    bn_stats: Mapping[str, Array],
    epsilon: float = 1e-5,
) -> tuple[Array, Array]:
    """Folds an eval-mode BatchNorm that follows a convolution into it.

    Args:
      kernel: Convolution kernel, ``(*window, in, out)`` (``flax.linen.Conv``
        layout; grouped convolutions too, the output features stay last).
      bias: Convolution bias ``(out,)`` or ``None``.
      bn_params: BatchNorm ``{"scale", "bias"}`` (either may be absent) or ``None``.
      bn_stats: BatchNorm running ``{"mean", "var"}``.
      epsilon: The BatchNorm's epsilon.

    Returns:
      ``(kernel, bias)`` of the folded convolution, in the kernel's dtype.

    Raises:
      ValueError: If the statistics do not match the output features.
    """
    return _fold(kernel, bias, bn_params, bn_stats, epsilon)


def fold_into_dense(
    kernel: Array,
    bias: Array | None,
    bn_params: Mapping[str, Array] | None,
    bn_stats: Mapping[str, Array],
    epsilon: float = 1e-5,
) -> tuple[Array, Array]:
    """Folds an eval-mode BatchNorm that follows a dense layer into it.

    Args:
      kernel: Dense kernel ``(in, out)``.
      bias: Dense bias ``(out,)`` or ``None``.
      bn_params: BatchNorm ``{"scale", "bias"}`` (either may be absent) or ``None``.
      bn_stats: BatchNorm running ``{"mean", "var"}``.
      epsilon: The BatchNorm's epsilon.

    Returns:
      ``(kernel, bias)`` of the folded dense layer, in the kernel's dtype.

    Raises:
      ValueError: If the statistics do not match the output features.
    """
    return _fold(kernel, bias, bn_params, bn_stats, epsilon)


def fold_small_bn_convnet(variables: Mapping[str, Any], epsilon: float = 1e-5) -> dict[str, Any]:
    """Folds every BatchNorm of a ``SmallBNConvNet`` into its convolution.

    Args:
      variables: ``{"params", "batch_stats"}`` of ``SmallBNConvNet(widths=...)``.
      epsilon: The BatchNorm layers' epsilon (the model's ``epsilon``).

    Returns:
      ``{"params"}`` for ``SmallBNConvNet(widths=..., use_batch_norm=False)``
      (the no-BN baseline, whose convolutions have biases), whose outputs equal
      the BN model's eval-mode outputs.
    """
    params, stats = variables["params"], variables["batch_stats"]
    folded: dict[str, Any] = {}
    i = 0
    while f"conv{i}" in params:
        conv = params[f"conv{i}"]
        kernel, bias = fold_into_conv(
            conv["kernel"], conv.get("bias"), params.get(f"bn{i}"), stats[f"bn{i}"], epsilon
        )
        folded[f"conv{i}"] = {"kernel": kernel, "bias": bias}
        i += 1
    folded["head"] = dict(params["head"])
    return {"params": folded}


def _norm_inputs(
    apply_fn: Callable[[Any, Any], Any],
    variables: Mapping[str, Any],
    x: Any,
    is_norm: Callable[[nn.Module], bool],
) -> dict[tuple[str, ...], tuple[tuple[str, ...], float]]:
    """``{norm path: (path of the layer it directly follows, its epsilon)}`` of one traced call.

    Each kernel layer's output and each norm's input are marked (``checkpoint_name``,
    an identity) so that the jaxpr shows who else reads a folded layer's output.
    """
    producers: dict[int, tuple[tuple[str, ...], str]] = {}  # id(output) -> (path, marker)
    pairs: dict[tuple[str, ...], tuple[tuple[str, ...], float]] = {}
    readers: dict[str, str] = {}  # Producer marker -> marker of the norm that reads it.

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        if is_norm(module):
            source = producers.get(id(args[0]))
            if source is None:
                raise ValueError(
                    f"norm layer {'/'.join(path)} does not directly follow a convolution or "
                    "dense layer: there is nothing to fold it into"
                )
            if any(source[0] == producer for producer, _ in pairs.values()):
                raise ValueError(f"layer {'/'.join(source[0])} feeds two norm layers")
            pairs[path] = (source[0], module.epsilon)
            readers[source[1]] = f"{_MARKER}norm:{'/'.join(path)}"
            args = (checkpoint_name(args[0], readers[source[1]]), *args[1:])
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        if module.has_variable("params", "kernel") and isinstance(out, jax.Array):
            marker = f"{_MARKER}{len(producers)}:{'/'.join(path)}"
            out = checkpoint_name(out, marker)
            producers[id(out)] = (path, marker)  # The output is kept: its id stays unique.
        return out

    with nn.intercept_methods(interceptor):
        jaxpr = jax.make_jaxpr(apply_fn)(variables, x)
    _check_only_the_norm_reads(jaxpr.jaxpr, readers)
    return pairs


_MARKER = "jbn.tools.folding:"


def _jaxprs(jaxpr: Any) -> Iterator[Any]:
    """A jaxpr and the jaxprs nested in its equations (cond, scan, remat, pjit, ...)."""
    yield jaxpr
    for eqn in jaxpr.eqns:
        for param in eqn.params.values():
            for value in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(value, "jaxpr", value)  # A ClosedJaxpr's, or a Jaxpr.
                if hasattr(inner, "eqns"):
                    yield from _jaxprs(inner)


def _is_marker(eqn: Any, name: str) -> bool:
    return eqn.primitive.name == "name" and eqn.params["name"] == name


def _check_only_the_norm_reads(jaxpr: Any, readers: Mapping[str, str]) -> None:
    """Raises if anything but its norm layer reads a marked layer output."""
    for inner in _jaxprs(jaxpr):
        marked = {
            eqn.outvars[0]: eqn.params["name"]
            for eqn in inner.eqns
            if eqn.primitive.name == "name" and eqn.params.get("name") in readers
        }
        for var, marker in marked.items():
            others = [
                eqn.primitive.name
                for eqn in inner.eqns
                if any(var is v for v in eqn.invars) and not _is_marker(eqn, readers[marker])
            ]
            if any(var is v for v in inner.outvars):
                others.append("returned")
            if others:
                layer = marker.removeprefix(_MARKER).partition(":")[2]
                norm = readers[marker].removeprefix(f"{_MARKER}norm:")
                raise ValueError(
                    f"the output of layer {layer} feeds norm layer {norm} and is also read "
                    f"elsewhere ({', '.join(sorted(set(others)))}): folding {norm} into {layer} would "
                    "change their input too; only a layer whose output feeds its norm layer "
                    "alone can be folded"
                )


def fold_batch_norm(
    apply_fn: Callable[[Any, Any], Any],
    variables: Mapping[str, Any],
    x: Any,
    *,
    is_norm: Callable[[nn.Module], bool] | None = None,
) -> dict[str, Any]:
    """Folds every BatchNorm of a network into the convolution or dense layer before it.

    The network is traced once (``jax.eval_shape``, nothing is computed) to
    find, for each norm layer, the layer whose output it takes directly; each
    norm's own ``epsilon`` is used. That output must feed nothing else (no
    residual sum, no other layer, not the network's output): the trace is
    checked for it.

    Args:
      apply_fn: Runs the model in eval mode, e.g. ``lambda v, x: model.apply(v,
        x, train=False)``.
      variables: ``{"params", "batch_stats"}`` of the model.
      x: An input (an array or a ``jax.ShapeDtypeStruct``) of the right shape.
      is_norm: Which modules count as BatchNorm layers (default: ``jbn.BatchNorm``,
        ``jbn.BatchRenorm``, ``flax.linen.BatchNorm``).

    Returns:
      ``{"params"}`` without the norm layers, every folded layer with a
      ``kernel`` and a ``bias``: the variables of the same network without
      normalisation (for `jbn.models`: ``use_batch_norm=False``), whose outputs
      equal the model's eval-mode outputs.

    Raises:
      ValueError: If a norm layer does not directly follow a layer with a kernel,
        or that layer's output feeds something else too.
    """
    pairs = _norm_inputs(apply_fn, variables, x, is_norm or is_batch_norm)
    params = _copy(variables["params"])
    stats = variables["batch_stats"]
    for norm_path, (layer_path, epsilon) in pairs.items():
        layer = _lookup(params, layer_path)
        kernel, bias = _fold(
            layer["kernel"],
            layer.get("bias"),
            _lookup(params, norm_path, {}),
            _lookup(stats, norm_path),
            epsilon,
        )
        layer.clear()
        layer.update(kernel=kernel, bias=bias)
        parent = _lookup(params, norm_path[:-1])
        parent.pop(norm_path[-1], None)
    return {"params": params}


def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


_MISSING = object()


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...], default: Any = _MISSING) -> Any:
    for name in path:
        if name not in tree:
            if default is _MISSING:
                raise KeyError(f"no variables at {'/'.join(path)}")
            return default
        tree = tree[name]
    return tree
