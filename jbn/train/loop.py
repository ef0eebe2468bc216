"""Training library: the jitted train step and the train-and-evaluate loop.

The train state and its initialisation live in `jbn.train.state`, evaluation
in `jbn.train.evaluation` (both re-exported here).

The steps are plain functions of arrays, jitted once per run with explicit
shardings over a device mesh (batch split over ``"data"``, state replicated)
and the state donated, so the same code runs on one CPU, on all devices of a
host and on many hosts.

Resuming is exact: the data order of a step is a function of ``(seed, epoch)``
and the position in the epoch, and the augmentation key of a step is
``fold_in(key, step)``, so N straight steps and k steps + restart from the
checkpoint + N-k steps give bitwise-identical states.

Example:
    >>> from configs import tiny  # doctest: +SKIP
    >>> train_and_evaluate(tiny.get_config(), "/tmp/run")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from jbn.train import (
    activation_probe,
    config_schema,
    cpu_tuning,
    data,
    datasets,
    distributed,
    epoch_metrics,
    preemption,
    run_config,
    run_log,
    run_summary,
    step_eval,
    tensorboard_log,
)
from jbn.train.checkpoint import Checkpointer
from jbn.train.evaluation import eval_step, evaluate, make_eval_step
from jbn.train.optim import make_schedule
from jbn.train.state import TrainState, create_train_state

__all__ = [
    "TrainState",
    "create_train_state",
    "eval_step",
    "evaluate",
    "make_eval_step",
    "make_train_step",
    "train_and_evaluate",
    "train_step",
]

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

CHECKPOINT_DIR = "checkpoints"
CURVES_FILE = "curves.png"
CONFIG_FILE = run_config.CONFIG_FILE


def _variables(state: TrainState, params: Any) -> dict[str, Any]:
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    augment: bool = True,
    info: datasets.DatasetInfo = data.CIFAR10.info,
) -> tuple[TrainState, Metrics]:
    """One SGD step on a batch of uint8 images, updating the BatchNorm statistics.

    Args:
        state: Current state (donated by `make_train_step`).
        batch: ``dict(image=uint8 [B, H, W, C], label=int32 [B])``.
        rng: Run-level PRNG key; the step's key is ``fold_in(rng, state.step)``.
        augment: Random crop + flip (``jbn.train.data.augment``) before normalising.
        info: The data set, whose channel statistics normalise the images.

    Returns:
        The new state and ``dict(loss, accuracy, finite)``, where ``finite`` is
        False when the loss or the updated parameters hold a NaN or infinity.
    """
    images = batch["image"]
    if augment:
        images = data.augment(jax.random.fold_in(rng, state.step), images)
    x = data.preprocess(images, info)
    labels = batch["label"]

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        logits, updates = state.apply_fn(
            _variables(state, params), x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates.get("batch_stats", state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(new_state.params))
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "finite": finite,
    }
    return new_state, metrics


def make_train_step(config: Any, mesh: Mesh) -> Any:
    """``train_step`` jitted over ``mesh`` with the state donated.

    On the CPU it is compiled with `cpu_tuning.train_step_compiler_options`.

    Returns:
        ``step(state, batch, rng) -> (state, metrics)``.
    """
    replicated = distributed.replicated(mesh)
    platform = mesh.devices.flat[0].platform
    step = functools.partial(
        train_step,
        augment=config.data.augment,
        info=datasets.info(config.data.get("name", "cifar10")),
    )
    return jax.jit(
        step,
        in_shardings=(replicated, distributed.batch_sharding(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=cpu_tuning.train_step_compiler_options(platform),
    )


def _check_finite(pending: list[tuple[int, Metrics]]) -> None:
    """Raises FloatingPointError naming the first step whose loss/params are non-finite."""
    for step, metrics in jax.device_get(pending):
        if not metrics["finite"]:
            raise FloatingPointError(
                f"Non-finite loss or parameters at train step {step} (loss={metrics['loss']}); "
                "stopping without checkpointing it. Lower optim.learning_rate or check the data."
            )
    pending.clear()


def train_and_evaluate(config: Any, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains, evaluates after every epoch, checkpoints, and resumes from ``workdir``.

    Before anything runs the config is validated (`jbn.train.config_schema`,
    and the probe against the model's shapes: `activation_probe.check_config`)
    and, if ``workdir`` holds checkpoints, compared with the config they were
    trained with (`jbn.train.run_config`). SIGTERM and SIGINT stop the run
    after the current step, with a checkpoint of it (`jbn.train.preemption`).

    Args:
        config: The run config (see ``configs/default.py``).
        workdir: Directory for ``checkpoints/``, ``metrics.jsonl``, ``config.json``
            and ``curves.png``;
            a re-run with the same workdir resumes from the latest checkpoint.

    Returns:
        The last metrics record (see `jbn.train.run_log`).

    Raises:
        ConfigError: A bad config value, or (`ResumeMismatchError`) a config
            that differs from the workdir's in a field that may not change.
        CheckpointMismatchError: The latest checkpoint does not fit the state.
        DataNotFoundError, DataFileError: Missing, unsafe or malformed data files.
        FloatingPointError: If a train step produces a non-finite loss or parameters.
        Preempted: On SIGTERM/SIGINT, once the last step is checkpointed.
    """
    config_schema.validate(config)
    activation_probe.check_config(config)  # On shapes, before any data or checkpoint.
    start_time = time.time()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as resources:  # Closed in reverse order, however _train ends.
        checkpointer = resources.enter_context(
            Checkpointer(workdir / CHECKPOINT_DIR, config.keep_checkpoints)
        )
        sync = agree = None
        if jax.process_count() > 1 and distributed.preemption_sync_available():
            sync = checkpointer.reached_preemption  # JAX's preemption sync owns SIGTERM.
        elif jax.process_count() > 1:
            agree = distributed.any_process  # Service off: our handlers, flags shared.
        stop = resources.enter_context(preemption.StopRequests(sync, agree=agree))
        state, dataset, mesh, record = _train(
            config, workdir, checkpointer, stop, resources, start_time
        )
    return _evaluate_and_finish(config, workdir, state, dataset, mesh, record, start_time)


def _train(
    config: Any,
    workdir: pathlib.Path,
    checkpointer: Checkpointer,
    stop: preemption.StopRequests,
    resources: contextlib.ExitStack,
    start_time: float,
) -> tuple[TrainState, datasets.Dataset, Mesh, dict[str, Any]]:
    """The body of `train_and_evaluate`: returns the final state and last record."""
    is_main = jax.process_index() == 0
    latest = checkpointer.latest_step()
    stop.report_start_step(latest or 0)  # First: a preemption notice from now on is not missed.
    notes = run_config.check_resume(workdir, config) if latest is not None else []
    mesh = config_schema.create_mesh(config)
    dataset = datasets.load(
        config.data.name,
        config.data.data_dir,
        download=config.data.download,
        checksums=config.data.checksums,
    )
    dataset = data.take_examples(dataset, config.data)
    config_schema.check_batch_fits(config, len(dataset.train_images), dataset.info.title)
    batch_size = config.data.batch_size
    steps_per_epoch = data.num_train_steps(len(dataset.train_images), batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    stop_step = min(total_steps, config.max_steps) if config.max_steps else total_steps
    schedule = make_schedule(config.optim, total_steps)

    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    state = create_train_state(config, init_rng, mesh, steps_per_epoch=steps_per_epoch)
    state, restored = checkpointer.restore_latest(state)
    start_step = int(state.step)
    progress = checkpointer.restore_progress(restored) if restored is not None else {}
    sums = epoch_metrics.EpochMetrics.resume(progress, start_step, steps_per_epoch)
    if is_main:
        print(run_summary.describe(config.model, state.params, state.batch_stats, mesh), flush=True)
        run_config.write(workdir, config)
        run_log.truncate_after(workdir, start_step)
        if restored is not None:
            print(f"Resumed from {checkpointer.directory} at step {restored}.", flush=True)
        else:
            print(
                f"Starting at step 0 of {stop_step} ({steps_per_epoch} per epoch); "
                f"checkpoints in {checkpointer.directory}.",
                flush=True,
            )
        for note in notes:
            print(f"Note: {note}", flush=True)
    scalars = resources.enter_context(
        contextlib.closing(
            tensorboard_log.open_writer(
                workdir, config.get("log"), start_step=start_step, is_main=is_main
            )
        )
    )
    p_train = make_train_step(config, mesh)
    p_eval = make_eval_step(mesh, dataset.info)
    # Optional step-wise test evaluations and activation probe (both off by default).
    run = {"start_step": start_step, "is_main": is_main}
    eval_fn = functools.partial(evaluate, dataset=dataset, config=config, mesh=mesh, step_fn=p_eval)
    evals = step_eval.StepEvaluations(
        config.get("eval_every_steps"), workdir, eval_fn, steps_per_epoch, start_time, **run
    )
    preprocess = functools.partial(data.preprocess, info=dataset.info)
    probe = activation_probe.ActivationProbe.from_config(
        config.get("probe"), workdir, dataset.test_images, preprocess, mesh=mesh, **run
    )
    evals.start(state)
    probe.start(state)
    record: dict[str, Any] = {}
    step = start_step
    # Nothing left to train (a finished run again, also one that stopped mid-epoch
    # at max_steps): no epoch, so no second record of the last one.
    epochs = range(start_step // steps_per_epoch, -(-stop_step // steps_per_epoch))
    for epoch in epochs if start_step < stop_step else ():
        first = epoch * steps_per_epoch
        end = min(first + steps_per_epoch, stop_step)
        if sums.epoch != epoch:
            sums = epoch_metrics.EpochMetrics(epoch)
        batches = data.train_batches(
            dataset.train_images,
            dataset.train_labels,
            batch_size,
            seed=config.seed,
            epoch=epoch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        batches = itertools.islice(batches, step - first, end - first)
        bar = tqdm(
            total=(end - step) * batch_size,
            desc=f"epoch {epoch + 1}/{config.num_epochs}",
            unit="img",
            unit_scale=True,
            disable=not is_main,
            leave=True,
        )
        epoch_start, epoch_begin = time.perf_counter(), step
        pending, stopping = [], False
        try:
            for batch in data.device_batches(batches, mesh, config.data.prefetch):
                state, metrics = p_train(state, batch, train_rng)
                step += 1
                pending.append((step, metrics))
                sums.add(metrics)
                bar.update(batch_size)
                evals.after_step(step, state, epoch_end=step == end)
                probe.after_step(step, state)
                if step % config.log_every_steps == 0 or step == end:
                    last = jax.device_get(metrics)
                    _check_finite(pending)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}")
                # Every step, on every process: they must agree on where to stop.
                stopping = stop.should_stop(step)
                # Not at the epoch's end: that save follows its record (below), so a run
                # killed while evaluating resumes before the end and writes the record.
                if (step % config.checkpoint_every_steps == 0 or stopping) and step < end:
                    _check_finite(pending)
                    checkpointer.save(step, state, sums.progress())
                if stopping:
                    break
            _check_finite(pending)
            if stopping and step < end:  # Mid-epoch: no record, the resumed run writes it.
                raise preemption.Preempted(
                    step, stop.signal_name, checkpointer.directory, stop.exit_code
                )
            means = sums.means()
            train_time = time.perf_counter() - epoch_start
            images_per_sec = (step - epoch_begin) * batch_size / train_time
            bar.set_postfix(
                loss=f"{means['train_loss']:.3f}",
                acc=f"{means['train_accuracy']:.3f}",
                img_s=f"{images_per_sec:.0f}",
            )
        finally:
            bar.close()
        record = {
            "epoch": round(step / steps_per_epoch, 4),
            "step": step,
            **means,
            **evaluate(state, dataset, config, mesh, p_eval),
            "images_per_sec": images_per_sec,
            "lr": float(schedule(step - 1)),
            "wall_time_s": time.time() - start_time,
        }
        evals.add_epoch_record(record)
        # The epoch's record: metrics.jsonl and the console (process 0 only).
        if is_main:
            run_log.append(workdir, record)
            scalars.write(record)
            print(
                f"epoch {record['epoch']:g}: train_loss={record['train_loss']:.4f} "
                f"test_loss={record['test_loss']:.4f} "
                f"test_accuracy={100 * record['test_accuracy']:.2f}% "
                f"images/s={images_per_sec:.0f}",
                flush=True,
            )
        checkpointer.save(step, state, sums.progress())
        if stopping and step < stop_step:  # At an epoch end, once its record is written.
            raise preemption.Preempted(
                step, stop.signal_name, checkpointer.directory, stop.exit_code
            )
    checkpointer.save(step, state, sums.progress())
    return state, dataset, mesh, record


def _evaluate_and_finish(
    config: Any,
    workdir: pathlib.Path,
    state: TrainState,
    dataset: datasets.Dataset,
    mesh: Mesh,
    record: dict[str, Any],
    start_time: float,
) -> dict[str, Any]:
    """Checks the replicas agree, completes the record, draws the curves, prints the summary."""
    from jbn.train import plot  # Imported late: matplotlib is only needed here.

    is_main = jax.process_index() == 0
    distributed.assert_replicas_agree(
        {"params": state.params, "batch_stats": state.batch_stats}, "params/batch_stats"
    )
    if is_main and jax.process_count() > 1:
        print(f"params and batch_stats agree across {jax.process_count()} processes.", flush=True)
    if not record:  # Nothing left to train: report the restored state.
        records = run_log.read(workdir) if is_main else []
        record = records[-1] if records else {"step": int(state.step)}
        p_eval = make_eval_step(mesh, dataset.info)
        record.update(evaluate(state, dataset, config, mesh, p_eval))
    if is_main:
        curves = workdir / CURVES_FILE
        if run_log.read(workdir):
            plot.plot_runs([workdir], curves)
        print(
            f"Done: step {record['step']}, test_accuracy={100 * record['test_accuracy']:.2f}% "
            f"test_loss={record['test_loss']:.4f} ({record['test_count']} images), "
            f"wall {time.time() - start_time:.0f}s; metrics in "
            f"{workdir / run_log.METRICS_FILE}, curves in {curves}.",
            flush=True,
        )
    return record
