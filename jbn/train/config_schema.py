"""What the training config accepts: one declarative rule per field, checked before anything runs.

`FIELDS` maps every leaf field of the config (dotted path) to a `Rule`: its
type, range or names, whether it may be ``None``, and whether it may change
when a run resumes in the same workdir (``resumable``; see
`jbn.train.run_config`). `CONSTRAINTS` are the checks that involve several
fields (classes of the data set, ghost batches, ...), `check_mesh` the ones
that need the devices (`create_mesh` builds the mesh and runs them), and
`check_batch_fits` the one that needs the data. `validate` runs the first
ones and raises one `ConfigError` with a line per bad value, naming the
field, the value and what is allowed.

Names come from where they are defined (``jbn.models.registry.model_names()``,
``NORM_NAMES``, ``jbn.train.datasets.names()``, ``jbn.train.optim``), looked
up when a config is checked, so a model registered later is accepted.

A new config field needs a rule here: ``tests/test_config_schema.py`` fails
for any leaf of a file in ``configs/`` without one, and `validate` refuses a
config with a field it does not know.

Example:
    >>> config = runpy.run_path("configs/default.py")["get_config"]()  # doctest: +SKIP
    >>> config.data.batch_size = 0  # doctest: +SKIP
    >>> validate(config)  # doctest: +SKIP
    ConfigError: config.data.batch_size=0: must be an integer >= 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from jbn.models import blocks, registry, resnet
from jbn.train import datasets, distributed, optim, tensorboard_log

__all__ = [
    "CONSTRAINTS",
    "FIELDS",
    "ConfigError",
    "Rule",
    "check_batch_fits",
    "check_fields",
    "check_mesh",
    "create_mesh",
    "leaves",
    "resumable_fields",
    "validate",
]

Names = Sequence[str] | Callable[[], Sequence[str]]


class ConfigError(ValueError):
    """Bad config values; the message has one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one config field accepts.

    Attributes:
        kind: ``"int"``, ``"number"`` (int or float, finite), ``"bool"``,
            ``"choice"`` (one of ``names``), ``"ints"`` (a non-empty sequence
            of ints), ``"path"`` or ``"name"`` (a non-empty string).
        low: Smallest allowed value (of each element for ``"ints"``), if any.
        high: Largest allowed value (of each element for ``"ints"``), if any.
        low_open: ``low`` itself is excluded.
        high_open: ``high`` itself is excluded.
        names: For ``"choice"``: the names, or a function returning them.
        extra: Further allowed values (e.g. -1 for "all remaining devices").
        optional: ``None`` is allowed.
        resumable: May differ from the workdir's ``config.json`` on resume.
        required: A config must have the field (False for fields that only
            some models have).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    names: Names = ()
    extra: tuple[Any, ...] = ()
    optional: bool = False
    resumable: bool = False
    required: bool = True

    def choices(self) -> tuple[str, ...]:
        """The allowed names of a ``"choice"`` rule, resolved now."""
        return tuple(self.names() if callable(self.names) else self.names)

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        if value is None:
            return self.optional
        if any(value == v and type(value) is type(v) for v in self.extra):
            return True
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if self.kind == "int":
            return is_int and self._in_range(value)
        if self.kind == "number":
            is_number = is_int or isinstance(value, float)
            return is_number and math.isfinite(value) and self._in_range(value)
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices()
        if self.kind == "ints":
            return (
                isinstance(value, Sequence)
                and not isinstance(value, str)
                and len(value) > 0
                and all(Rule("int", low=self.low, high=self.high).accepts(v) for v in value)
            )
        if self.kind in ("path", "name"):
            return isinstance(value, str) and bool(value)
        raise ValueError(f"Unknown rule kind {self.kind!r}.")

    def _range_text(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f" in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def describe(self) -> str:
        """What is allowed, in words (completes "must be ...")."""
        text = {
            "int": f"an integer{self._range_text()}",
            "number": f"a finite number{self._range_text()}",
            "bool": "True or False",
            "choice": "one of " + ", ".join(repr(name) for name in self.choices()),
            "ints": f"a non-empty sequence of integers{self._range_text()}",
            "path": "a non-empty path",
            "name": "a non-empty name",
        }[self.kind]
        alternatives = [repr(v) for v in self.extra] + (["None"] if self.optional else [])
        return text + "".join(f", or {alt}" for alt in alternatives)


# One rule per leaf field of configs/default.py (dotted path -> Rule).
FIELDS: dict[str, Rule] = {
    "seed": Rule("int", low=0),
    "num_epochs": Rule("int", low=1, resumable=True),
    "max_steps": Rule("int", low=1, optional=True, resumable=True),
    "model.name": Rule("choice", names=registry.model_names),
    "model.num_classes": Rule("int", low=1),
    # SmallBNConvNet's own fields.
    "model.widths": Rule("ints", low=1, required=False),
    "model.use_batch_norm": Rule("bool"),
    "model.norm": Rule("choice", names=lambda: registry.NORM_NAMES),
    "model.bn_momentum": Rule("number", low=0, high=1),
    "model.bn_epsilon": Rule("number", low=0, low_open=True),
    # Implementation choices with the same variables and maths: may change.
    "model.patch_conv_channels": Rule("int", low=0, resumable=True, required=False),
    "model.native_input_conv": Rule("bool", resumable=True, required=False),
    # The ResNets' own fields (jbn.models.resnet); None: the model's default shortcut.
    "model.stem": Rule("choice", names=resnet.STEMS, required=False),
    "model.shortcut": Rule("choice", names=blocks.SHORTCUTS, optional=True, required=False),
    "model.activation": Rule("choice", names=lambda: tuple(blocks.ACTIVATIONS), required=False),
    "model.zero_init_residual": Rule("bool", required=False),
    # norm="renorm": final clips, reached after warm-up + ramp steps (None: fixed clips).
    "model.renorm_r_max": Rule("number", low=1, required=False),
    "model.renorm_d_max": Rule("number", low=0, required=False),
    "model.renorm_warmup_steps": Rule("int", low=0, optional=True, required=False),
    "model.renorm_ramp_steps": Rule("int", low=0, optional=True, required=False),
    "model.bn_stats": Rule("choice", names=distributed.BATCH_STATS_MODES),
    "model.virtual_batch_size": Rule("int", low=1, optional=True),
    "optim.name": Rule("choice", names=lambda: optim.OPTIMIZER_NAMES),
    "optim.learning_rate": Rule("number", low=0),
    "optim.momentum": Rule("number", low=0, high=1),
    "optim.nesterov": Rule("bool"),
    "optim.weight_decay": Rule("number", low=0),
    "optim.weight_decay_on": Rule("choice", names=lambda: optim.WEIGHT_DECAY_TARGETS),
    "optim.schedule": Rule("choice", names=lambda: optim.SCHEDULE_NAMES),
    "optim.warmup_fraction": Rule("number", low=0, high=1, high_open=True),
    "optim.div_factor": Rule("number", low=0, low_open=True),
    "optim.final_div_factor": Rule("number", low=0, low_open=True),
    "data.name": Rule("choice", names=datasets.names),
    "data.data_dir": Rule("path", optional=True, resumable=True),
    "data.download": Rule("bool", resumable=True),
    "data.checksums": Rule("choice", names=datasets.CHECKSUM_MODES, resumable=True),
    "data.batch_size": Rule("int", low=1),
    "data.eval_batch_size": Rule("int", low=1, resumable=True),
    "data.augment": Rule("bool"),
    "data.prefetch": Rule("int", low=0, resumable=True),
    # Subsets (the first N images): they change what is trained and measured.
    "data.num_train_examples": Rule("int", low=1, optional=True),
    "data.num_test_examples": Rule("int", low=1, optional=True),
    "mesh.data": Rule("int", low=1, extra=(-1,), resumable=True),
    "checkpoint_every_steps": Rule("int", low=1, resumable=True),
    "keep_checkpoints": Rule("int", low=1, optional=True, resumable=True),
    "log_every_steps": Rule("int", low=1, resumable=True),
    # TensorBoard event files: None writes them when tensorboardX is installed.
    "log.tensorboard": Rule("bool", optional=True, resumable=True),
    # What is measured along the way (jbn.train.step_eval, jbn.train.activation_probe).
    "eval_every_steps": Rule("int", low=1, optional=True, resumable=True),
    "probe.every_steps": Rule("int", low=1, optional=True, resumable=True),
    "probe.intermediate": Rule("name", optional=True, resumable=True),
    "probe.unit": Rule("int", low=0, optional=True, resumable=True),
    "probe.percentiles": Rule("ints", low=0, high=100, resumable=True),
    "probe.num_examples": Rule("int", low=1, resumable=True),
}


def leaves(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yields ``(dotted path, value)`` for every leaf of a nested config or dict."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            yield from leaves(value, path + ".")
        else:
            yield path, value


def resumable_fields() -> tuple[str, ...]:
    """The fields that may change between runs of one workdir, in `FIELDS` order."""
    return tuple(path for path, rule in FIELDS.items() if rule.resumable)


def _bad(path: str, value: Any, allowed: str) -> str:
    return f"config.{path}={value!r}: must be {allowed}."


def check_fields(config: Mapping[str, Any]) -> list[str]:
    """Checks every field against its rule, and that no field is unknown or missing."""
    problems = []
    values = dict(leaves(config))
    for path, rule in FIELDS.items():  # In the order of FIELDS.
        if path not in values:
            if rule.required:
                problems.append(f"config.{path}: missing; must be {rule.describe()}.")
        elif not rule.accepts(values[path]):
            problems.append(_bad(path, values[path], rule.describe()))
    for path in sorted(set(values) - set(FIELDS)):
        problems.append(f"config.{path}: unknown field (no rule in jbn.train.config_schema).")
    return problems


def _num_classes_of_data(config: Any) -> str | None:
    classes = datasets.info(config.data.name).num_classes
    if config.model.num_classes != classes:
        return _bad(
            "model.num_classes",
            config.model.num_classes,
            f"{classes}, the number of classes of data.name={config.data.name!r}",
        )
    return None


def _augment_suits_data(config: Any) -> str | None:
    if config.data.augment and not datasets.info(config.data.name).augmentable:
        return _bad(
            "data.augment",
            True,
            f"False for data.name={config.data.name!r} (a flipped or shifted digit "
            "is no longer the same digit)",
        )
    return None


def _batch_stats_groups(config: Any) -> str | None:
    mode, size = config.model.bn_stats, config.model.virtual_batch_size
    if mode != "ghost":
        if size is not None:
            return _bad("model.virtual_batch_size", size, "None unless model.bn_stats='ghost'")
        return None
    if size is None or config.data.batch_size % size:
        return _bad(
            "model.virtual_batch_size",
            size,
            f"an integer dividing data.batch_size={config.data.batch_size} "
            "when model.bn_stats='ghost'",
        )
    return None


# Norm layers without batch groups (virtual_batch_size): only jbn.BatchNorm has them.
_NORMS_WITHOUT_GROUPS = {"flax": "flax.linen.BatchNorm", "renorm": "jbn.BatchRenorm"}


def _norm_without_groups(config: Any) -> str | None:
    layer = _NORMS_WITHOUT_GROUPS.get(config.model.norm)
    if config.model.use_batch_norm and layer and config.model.bn_stats != "global":
        return _bad(
            "model.bn_stats",
            config.model.bn_stats,
            f"'global' with model.norm={config.model.norm!r} ({layer} has no batch groups)",
        )
    return None


def _nesterov_needs_momentum(config: Any) -> str | None:
    if config.optim.nesterov and not config.optim.momentum:
        return _bad("optim.nesterov", True, "False when optim.momentum=0 (Nesterov needs momentum)")
    return None


def _probe_needs_a_name(config: Any) -> str | None:
    probe = config.get("probe")
    if probe is not None and probe.every_steps is not None and probe.intermediate is None:
        return _bad(
            "probe.intermediate",
            None,
            "the name of a value the model sows (e.g. 'pre_activation_3' of the mlp) "
            f"when probe.every_steps={probe.every_steps}",
        )
    return None


def _plain_nets_have_no_shortcut(config: Any) -> str | None:
    # jbn.models.cifar_resnet's plain20/32/56 refuse any shortcut but "none".
    name, shortcut = config.model.name, config.model.get("shortcut")
    if name.startswith("plain") and shortcut not in (None, "none"):
        return _bad(
            "model.shortcut",
            shortcut,
            f"None or 'none' for model.name={name!r} (a plain network has no shortcuts)",
        )
    return None


def _tensorboard_installed(config: Any) -> str | None:
    log = config.get("log")
    if log is not None and log.get("tensorboard") is True and not tensorboard_log.installed():
        return _bad(
            "log.tensorboard",
            True,
            f"None or False: tensorboardX is not installed ({tensorboard_log.INSTALL_HINT})",
        )
    return None


# Checks across fields, run once every field has passed its own rule.
CONSTRAINTS: tuple[Callable[[Any], str | None], ...] = (
    _num_classes_of_data,
    _augment_suits_data,
    _batch_stats_groups,
    _norm_without_groups,
    _nesterov_needs_momentum,
    _probe_needs_a_name,
    _plain_nets_have_no_shortcut,
    _tensorboard_installed,
)


def check_mesh(config: Any, data_axis_size: int, process_count: int) -> list[str]:
    """Checks that the batch sizes split evenly over the devices and processes.

    Args:
        config: The run config.
        data_axis_size: Devices along the mesh's ``"data"`` axis.
        process_count: Processes of the run.

    Returns:
        One message per batch size that does not divide.
    """
    problems = []
    for field in ("batch_size", "eval_batch_size"):
        size = config.data[field]
        for parts, what in ((data_axis_size, "devices"), (process_count, "processes")):
            if size % parts:
                problems.append(
                    _bad(f"data.{field}", size, f"a multiple of {parts}, the number of {what}")
                )
                break
    return problems


def check_batch_fits(config: Any, num_train: int, title: str) -> None:
    """Checks that one batch fits in the ``num_train`` training images of data set ``title``.

    Raises:
        ConfigError: If ``data.batch_size`` is larger.
    """
    if config.data.batch_size > num_train:
        allowed = f"at most {num_train}, the training images of {title}"
        raise ConfigError([_bad("data.batch_size", config.data.batch_size, allowed)])


def create_mesh(config: Any) -> Mesh:
    """The device mesh of ``config.mesh``, once the batch sizes are checked against it.

    Raises:
        ConfigError: If the mesh does not fit the devices or a batch size does
            not divide over it.
    """
    try:
        mesh = distributed.create_mesh(config.mesh)
    except ValueError as e:
        raise ConfigError([f"config.mesh={config.mesh.to_dict()}: {e}"]) from e
    validate(
        config, data_axis_size=mesh.shape[distributed.DATA_AXIS], process_count=jax.process_count()
    )
    return mesh


def validate(
    config: Any, *, data_axis_size: int | None = None, process_count: int | None = None
) -> None:
    """Checks the whole config; raises on the first pass that finds problems.

    Args:
        config: The run config (a ``ConfigDict`` like ``configs/default.py``'s).
        data_axis_size: Devices along the mesh's ``"data"`` axis, to check the
            batch sizes against (skipped if None).
        process_count: Processes of the run (default 1).

    Raises:
        ConfigError: With one line per bad value.
    """
    problems = check_fields(config)
    if not problems:
        problems = [p for check in CONSTRAINTS if (p := check(config)) is not None]
    if not problems and data_axis_size is not None:
        problems = check_mesh(config, data_axis_size, process_count or 1)
    if problems:
        raise ConfigError(problems)
