"""Sweep runner: trains the named variants of a base config in turn, one workdir each.

Usage::

    python -m jbn.sweep --sweep configs/sweeps/bn_vs_lr.py --root runs/bn_vs_lr \
        --sweep.base.data.data_dir=/path/to/cifar-10-batches-py [--only bn_lr0.1,nobn_lr0.1]

A sweep file is an ``ml_collections`` config with two fields:

- ``base``: a full training config (see ``configs/default.py``) with the
  overrides shared by every variant (budget, seed) already applied; any field
  can be overridden from the command line as ``--sweep.base.<field>=value``.
- ``variants``: variant name -> ``{"dotted.field": value}`` overrides of
  ``base`` (a ``ConfigDict(..., allow_dotted_keys=True)``).

Each variant trains with `jbn.train.loop.train_and_evaluate` in ``root/<name>``.
A finished variant has ``root/<name>/status.json`` with ``status`` ``"done"``
or ``"diverged"`` and is skipped on a re-run; an interrupted one resumes from
its checkpoints. A non-finite loss (`FloatingPointError`) is recorded as
``"diverged"`` with its step and the sweep goes on; any other error stops the
sweep. Every variant's config is validated (`jbn.train.config_schema`) before
the first one trains. SIGTERM or Ctrl-C stops the variant in training after
its current step, checkpointed (`jbn.train.preemption`; exit code 143 or 130),
and a re-run resumes it. Every invocation, stopped or not, appends its command
line and wall time to ``root/sweep_log.jsonl`` (read by `jbn.experiments.report`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections

from jbn.train import run_log

__all__ = [
    "STATUS_FILE",
    "SWEEP_LOG_FILE",
    "main",
    "read_status",
    "run_sweep",
    "run_variant",
    "variant_config",
]

STATUS_FILE = "status.json"
SWEEP_LOG_FILE = "sweep_log.jsonl"
_STEP_RE = re.compile(r"train step (\d+)")

TrainFn = Callable[[ml_collections.ConfigDict, pathlib.Path], Mapping[str, Any]]


def variant_config(
    base: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """Returns a resolved copy of ``base`` with dotted-key ``overrides`` applied.

    Args:
        base: The base training config (left unchanged).
        overrides: ``{"optim.learning_rate": 0.4, ...}``.

    Returns:
        A new, unlocked config.

    Raises:
        KeyError: If an override names a field that ``base`` does not have.
    """
    config = base.copy_and_resolve_references()
    config.unlock()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        if leaf not in target:
            raise KeyError(f"Override {key!r} names no field of the base config.")
        target[leaf] = value
    return config


def read_status(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """Returns the parsed ``status.json`` of a run directory, or None if absent."""
    path = pathlib.Path(workdir) / STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _write_status(workdir: pathlib.Path, status: Mapping[str, Any]) -> None:
    tmp = workdir / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(dict(status), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, workdir / STATUS_FILE)


def _is_complete(status: Mapping[str, Any], config: ml_collections.ConfigDict) -> bool:
    """Diverged, or done with the whole budget of ``config`` (not a shorter max_steps)."""
    if status.get("status") == "diverged":
        return True
    if status.get("status") != "done":
        return False
    final = status.get("final") or {}
    if final.get("epoch", 0) >= config.num_epochs:
        return True
    return bool(config.max_steps) and (status.get("step") or 0) >= config.max_steps


def _default_train_fn(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Any:
    from jbn.train import loop  # Imported late: JAX starts only when something trains.

    return loop.train_and_evaluate(config, workdir)


def run_variant(
    name: str,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    train_fn: TrainFn | None = None,
) -> dict[str, Any]:
    """Trains one variant unless finished; records ``done`` or ``diverged``.

    Args:
        name: Variant name (stored in the status).
        config: Its full training config.
        workdir: Its run directory (created if missing; resumed if it holds
            checkpoints).
        overrides: The variant's overrides, stored in the status for reference.
        train_fn: ``fn(config, workdir) -> final record``; defaults to
            `jbn.train.loop.train_and_evaluate`.

    Returns:
        The status: ``name``, ``status`` (``"done"``/``"diverged"``), ``step``,
        ``final`` (last metrics record or None), ``message``, ``overrides``,
        ``wall_time_s`` and ``skipped`` (True if it was already finished).
    """
    workdir = pathlib.Path(workdir)
    status = read_status(workdir)
    if status is not None and _is_complete(status, config):
        return {**status, "skipped": True}
    records = run_log.read(workdir)
    if status is None and records and records[-1]["epoch"] >= config.num_epochs:
        # Finished by a run that predates the status file (e.g. train.py).
        status = {"status": "done", "step": records[-1]["step"], "message": "", "wall_time_s": 0.0}
        status.update(name=name, final=records[-1], overrides=dict(overrides or {}))
        _write_status(workdir, status)
        return {**status, "skipped": True}

    workdir.mkdir(parents=True, exist_ok=True)
    train_fn = train_fn or _default_train_fn
    start = time.time()
    try:
        final = dict(train_fn(config, workdir))
        state, step, message = "done", final.get("step"), ""
    except FloatingPointError as error:
        message = str(error)
        match = _STEP_RE.search(message)
        state, step = "diverged", int(match.group(1)) if match else None
        records = run_log.read(workdir)
        final = records[-1] if records else None
    status = {
        "name": name,
        "status": state,
        "step": step,
        "final": final,
        "message": message,
        "overrides": dict(overrides or {}),
        "wall_time_s": time.time() - start,
    }
    _write_status(workdir, status)
    return {**status, "skipped": False}


def _validate_variants(sweep: ml_collections.ConfigDict, names: Iterable[str]) -> None:
    """Checks every variant's config before the first one trains.

    Raises:
        ConfigError: With one line per bad value, prefixed by the variant's name.
    """
    from jbn.train import config_schema  # Imported late, as the loop (JAX).

    problems = []
    for name in names:
        try:
            config_schema.validate(variant_config(sweep.base, dict(sweep.variants[name])))
        except config_schema.ConfigError as error:
            problems += [f"variant {name}: {problem}" for problem in error.problems]
    if problems:
        raise config_schema.ConfigError(problems)


def run_sweep(
    sweep: ml_collections.ConfigDict,
    root: str | os.PathLike,
    only: Iterable[str] | None = None,
    train_fn: TrainFn | None = None,
) -> dict[str, dict[str, Any]]:
    """Runs every variant of ``sweep`` (or those in ``only``) in turn under ``root``.

    Args:
        sweep: The sweep config (``base`` and ``variants``).
        root: Parent directory; variant ``name`` trains in ``root/name``.
        only: Variant names to run (default: all, in the file's order).
        train_fn: See `run_variant`.

    Returns:
        Variant name -> status (see `run_variant`), in run order.

    Raises:
        KeyError: If ``only`` names an unknown variant.
    """
    root = pathlib.Path(root)
    names = list(sweep.variants.keys())
    if only is not None:
        only = list(only)
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise KeyError(f"Unknown variants {unknown}; the sweep has {names}.")
        names = [n for n in names if n in only]
    _validate_variants(sweep, names)
    results = {}
    for i, name in enumerate(names):
        overrides = dict(sweep.variants[name])
        config = variant_config(sweep.base, overrides)
        print(f"[sweep {i + 1}/{len(names)}] {name}: {overrides}", flush=True)
        result = run_variant(name, config, root / name, overrides, train_fn)
        verb = "skipped, already" if result["skipped"] else "finished,"
        print(f"[sweep] {name} {verb} {result['status']} at step {result['step']}", flush=True)
        results[name] = result
    return results


def _exit_cleanly_on_user_errors(error: BaseException) -> None:
    """Bad configs and preemption end the CLI with their message and exit code, no traceback."""
    from jbn.train import config_schema, preemption

    if isinstance(error, config_schema.ConfigError):
        print(error, file=sys.stderr, flush=True)
        sys.exit(2)
    if isinstance(error, preemption.Preempted):
        print(error, file=sys.stderr, flush=True)
        sys.exit(error.exit_code)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (absl flags; see the module docstring)."""
    from absl import app, flags, logging
    from ml_collections import config_flags

    flags.DEFINE_string("root", None, "Parent directory of the variants' workdirs.", required=True)
    flags.DEFINE_list("only", None, "Comma-separated variant names to run (default: all).")
    config_flags.DEFINE_config_file("sweep", None, "Sweep config file.", lock_config=True)

    def run(args: list[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"Unexpected arguments: {args[1:]}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
        root = pathlib.Path(flags.FLAGS.root)
        root.mkdir(parents=True, exist_ok=True)
        start = time.time()
        entry: dict[str, Any] = {
            "command": "python -m jbn.sweep " + shlex.join(sys.argv[1:]),
            "start": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)),
        }
        try:
            results = run_sweep(flags.FLAGS.sweep, root, flags.FLAGS.only)
            entry["trained"] = [n for n, r in results.items() if not r["skipped"]]
            entry["skipped"] = [n for n, r in results.items() if r["skipped"]]
        except BaseException as error:  # Logged (wall time counts), then re-raised.
            entry["error"] = repr(error)
            _exit_cleanly_on_user_errors(error)
            raise
        finally:
            entry["wall_time_s"] = round(time.time() - start, 1)
            with open(root / SWEEP_LOG_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")
        print(f"[sweep] {len(results)} variants, wall {entry['wall_time_s']:.0f}s", flush=True)

    app.run(run, argv=argv)


if __name__ == "__main__":
    # As train.py (see jbn.train.cpu_tuning), but re-executed with -m so that the
    # module runs as part of the package.
    from jbn.train import cpu_tuning

    cpu_tuning.reexec_tuned([sys.executable, "-m", "jbn.sweep", *sys.argv[1:]])
    main()
