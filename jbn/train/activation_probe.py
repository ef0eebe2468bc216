"""Percentiles of one intermediate value of the network over training (the paper's Figure 1b/c).

Ioffe & Szegedy (2015) show how the input of a sigmoid in the last hidden
layer moves during training as its 15th, 50th and 85th percentiles over
examples. This probe records such percentiles for any value a model sows
(``self.sow("intermediates", name, x)``, e.g. `jbn.models.MLP`'s
``pre_activation_3``) on a fixed batch, the first ``num_examples`` test
images, at step 0 and every ``every_steps`` steps.

It runs the model in inference mode (BatchNorm with its running statistics,
nothing updated), so it sees what the network computes for those images at
that step. Records go to ``workdir/probe.jsonl``, one per probed step:
``{"step": 100, "intermediate": "pre_activation_3", "unit": 0, "p15": ...,
"p50": ..., "p85": ...}``; on resume the file is cut back to the restored
step.

Configured by ``config.probe`` (see ``configs/default.py``): ``every_steps``
(None: off), ``intermediate`` (the sown name; ``a/b`` for a value sown by
submodule ``a``), ``unit`` (index on the last axis; None pools every unit),
``percentiles`` and ``num_examples``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jbn.models import registry
from jbn.train import config_schema, datasets, distributed, evaluation, run_log

__all__ = [
    "PROBE_FILE",
    "ActivationProbe",
    "check_config",
    "percentile_key",
    "read",
    "sown_value",
]

PROBE_FILE = "probe.jsonl"


def read(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Returns the records of ``workdir/probe.jsonl`` (empty if none)."""
    return run_log.read(workdir, PROBE_FILE)


def percentile_key(q: float) -> str:
    """The record key of percentile ``q``: ``15 -> "p15"``, ``2.5 -> "p2.5"``."""
    return f"p{q:g}"


def _sown_names(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    names = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            names += _sown_names(value, f"{prefix}{key}/")
        else:
            names.append(prefix + key)
    return names


def sown_value(intermediates: Mapping[str, Any], name: str) -> Any:
    """The last value sown under ``name`` (``"a/b"`` descends into submodule ``a``).

    Raises:
        KeyError: If nothing was sown under ``name``; the message lists what was.
    """
    node: Any = intermediates
    for part in name.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            known = _sown_names(intermediates)
            raise KeyError(f"The model sows no intermediate {name!r}; it sows {known}.")
        node = node[part]
    if isinstance(node, Mapping):
        raise KeyError(f"{name!r} names a submodule, not a value; give one of {_sown_names(node)}.")
    return node[-1]  # sow appends to a tuple; one call per apply gives one entry.


def check_config(config: Any) -> None:
    """Checks that the model sows ``config.probe.intermediate`` (and has its ``unit``).

    Runs on shapes only (``jax.eval_shape`` of the model's initialisation and
    of an inference pass on one image of the data set's shape), so it needs
    neither the data nor any device work: `jbn.train.loop.train_and_evaluate`
    calls it before it loads the data or touches the workdir. A no-op when
    the probe is off.

    Raises:
        ConfigError: Naming ``probe.intermediate`` with the names the model
            sows, or ``probe.unit`` with the value's number of units.
    """
    probe = config.get("probe")
    if probe is None or probe.get("every_steps") is None or not probe.get("intermediate"):
        return  # Off, or config_schema.validate names the missing name.
    model_config = config.model.copy_and_resolve_references()
    with model_config.unlocked():
        # The same variables and shapes without the native kernel (built on first
        # use) and without batch groups (one image; inference ignores them).
        if "native_input_conv" in model_config:
            model_config.native_input_conv = False
        model_config.virtual_batch_size = None
    model = registry.make_model(model_config)
    image = jax.ShapeDtypeStruct((1, *datasets.info(config.data.name).image_shape), jnp.float32)

    def sown(inputs: jax.Array) -> Any:
        variables = model.init(jax.random.key(0), inputs, train=False)
        _, state = model.apply(variables, inputs, train=False, mutable=["intermediates"])
        return state.get("intermediates", {})

    intermediates = jax.eval_shape(sown, image)
    name, unit = probe.intermediate, probe.get("unit")
    try:
        value = sown_value(intermediates, name)
    except KeyError:
        names = ", ".join(_sown_names(intermediates)) or "none"
        raise config_schema.ConfigError(
            [
                f"config.probe.intermediate={name!r}: must name a value that "
                f"model.name={config.model.name!r} sows: {names}."
            ]
        ) from None
    if unit is not None and not -value.shape[-1] <= unit < value.shape[-1]:
        raise config_schema.ConfigError(
            [
                f"config.probe.unit={unit!r}: must be an index on the last axis of {name!r} "
                f"({value.shape[-1]} units), or None."
            ]
        )


class ActivationProbe:
    """Records percentiles of a sown intermediate on a fixed batch every N steps.

    Every process must call `start` and `after_step` at the same steps (the
    computation spans the mesh); only the main process writes the file.

    Args:
        every_steps: Probe at step 0 and every multiple of this; None turns the
            whole object into a no-op.
        workdir: The run directory (``probe.jsonl`` goes there).
        inputs: The fixed batch, preprocessed as the model sees it, ``[N, ...]``.
        intermediate: The sown name (see `sown_value`).
        unit: Index on the value's last axis (one feature, e.g. one sigmoid);
            None pools all of them.
        percentiles: In [0, 100], over the examples (and any spatial positions).
        mesh: The device mesh of the replicated train state.
        start_step: The step training starts (or resumes) from.
        is_main: Whether this process writes the file.
    """

    def __init__(
        self,
        every_steps: int | None,
        workdir: str | os.PathLike,
        inputs: Any,
        *,
        intermediate: str | None,
        unit: int | None,
        percentiles: Sequence[float],
        mesh: Mesh,
        start_step: int,
        is_main: bool = True,
    ) -> None:
        if every_steps is not None and (isinstance(every_steps, bool) or every_steps < 1):
            raise ValueError(f"config.probe.every_steps={every_steps!r}: must be >= 1 or None.")
        self.every_steps = every_steps
        self.workdir = pathlib.Path(workdir)
        self._start_step = start_step
        self._is_main = is_main
        if not self.enabled:
            return
        if not intermediate:
            raise ValueError("config.probe.intermediate: name the sown value to probe.")
        qs = [float(q) for q in percentiles]
        if not qs or not all(0 <= q <= 100 for q in qs):
            raise ValueError(f"config.probe.percentiles={percentiles!r}: give values in [0, 100].")
        self.intermediate, self.unit, self.percentiles = intermediate, unit, tuple(qs)
        replicated = distributed.replicated(mesh)
        self._inputs = jax.make_array_from_process_local_data(
            replicated, np.asarray(inputs, np.float32)
        )
        self._compute = jax.jit(self._percentiles, in_shardings=(replicated, replicated))
        if is_main:
            run_log.truncate_after(self.workdir, start_step if start_step else -1, PROBE_FILE)

    @classmethod
    def from_config(
        cls,
        probe_config: Any,
        workdir: str | os.PathLike,
        images: np.ndarray,
        preprocess: Callable[[Any], Any],
        *,
        mesh: Mesh,
        start_step: int,
        is_main: bool = True,
    ) -> ActivationProbe:
        """Builds the probe of ``config.probe`` (None or no ``every_steps``: off).

        Args:
            probe_config: ``config.probe`` or None.
            workdir: The run directory.
            images: Host images; the first ``probe_config.num_examples`` are probed.
            preprocess: Maps those (uint8) images to the model's input.
            mesh: See the class.
            start_step: See the class.
            is_main: See the class.
        """
        every = probe_config.get("every_steps") if probe_config is not None else None
        if every is None:
            off = {"intermediate": None, "unit": None, "percentiles": ()}
            return cls(None, workdir, None, mesh=mesh, start_step=start_step, **off)
        num = probe_config.num_examples
        if not isinstance(num, int) or not 1 <= num <= len(images):
            raise ValueError(
                f"config.probe.num_examples={num!r}: must be an integer in [1, {len(images)}]."
            )
        return cls(
            every,
            workdir,
            preprocess(images[:num]),
            intermediate=probe_config.intermediate,
            unit=probe_config.get("unit"),
            percentiles=tuple(probe_config.percentiles),
            mesh=mesh,
            start_step=start_step,
            is_main=is_main,
        )

    @property
    def enabled(self) -> bool:
        """Whether the probe is on."""
        return self.every_steps is not None

    def _percentiles(self, state: Any, inputs: jax.Array) -> jax.Array:
        variables = evaluation.model_variables(state)
        _, sown = state.apply_fn(variables, inputs, train=False, mutable=["intermediates"])
        value = sown_value(sown.get("intermediates", {}), self.intermediate)
        if self.unit is not None:
            if not -value.shape[-1] <= self.unit < value.shape[-1]:
                raise ValueError(
                    f"config.probe.unit={self.unit}: {self.intermediate!r} has "
                    f"{value.shape[-1]} units on its last axis."
                )
            value = value[..., self.unit]
        return jnp.percentile(value.reshape(-1), jnp.asarray(self.percentiles))

    def compute(self, state: Any) -> dict[str, float]:
        """The percentiles of the current state, ``{"p15": ..., ...}``."""
        values = jax.device_get(self._compute(state, self._inputs))
        return {percentile_key(q): float(v) for q, v in zip(self.percentiles, values, strict=True)}

    def start(self, state: Any) -> None:
        """Checks the probe fits the model, then probes the initial state from step 0.

        Raises:
            KeyError: If the model sows no ``intermediate`` of that name.
            ValueError: If ``unit`` is out of range.
        """
        if not self.enabled:
            return
        jax.eval_shape(self._percentiles, state, self._inputs)  # Fails early on a bad name.
        if self._start_step == 0:
            self._log(0, state)

    def after_step(self, step: int, state: Any) -> None:
        """Probes after train step ``step`` if it is due."""
        if self.enabled and step % self.every_steps == 0:
            self._log(step, state)

    def _log(self, step: int, state: Any) -> None:
        values = self.compute(state)
        if self._is_main:
            record = {"step": step, "intermediate": self.intermediate, "unit": self.unit}
            run_log.append(self.workdir, {**record, **values}, PROBE_FILE)
