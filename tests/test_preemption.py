"""Graceful SIGTERM/SIGINT, kill -9 and resumes: the resumed run ends where a straight one does.

The in-process tests send a signal at a known step through a wrapped train
step. The subprocess tests run the real ``train.py`` from another working
directory and wait on what it writes (a line, a checkpoint directory), never
on timing, so they hold on a loaded machine.
"""

from __future__ import annotations

import pathlib
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import overridden
from train_cli import train_command

from jbn.train import loop, preemption, run_log, step_eval
from jbn.train.checkpoint import Checkpointer

TIMEOUT_S = 240
TIMING_FIELDS = ("images_per_sec", "wall_time_s")


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def _final_state(workdir):
    """The arrays of the newest checkpoint, read without a target."""
    directory = pathlib.Path(workdir) / loop.CHECKPOINT_DIR
    step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    with ocp.StandardCheckpointer() as checkpointer:
        return step, jax.device_get(checkpointer.restore(directory / str(step) / "state"))


def _assert_same_run(workdir, reference):
    """Same metrics records (but timing) and bitwise the same final state."""
    records, (step, state) = reference
    assert _without_timing(run_log.read(workdir)) == records
    got_step, got_state = _final_state(workdir)
    assert got_step == step
    jax.tree.map(np.testing.assert_array_equal, got_state, state)


# --- in process: a signal at a known step -------------------------------------------------


def _signal_after_call(monkeypatch, call, signum):
    """Makes the train step send ``signum`` to this process right after its ``call``-th run."""
    make = loop.make_train_step

    def make_signalling(config, mesh):
        step = make(config, mesh)
        calls = 0

        def signalling(*args):
            nonlocal calls
            out = step(*args)
            calls += 1
            if calls == call:
                signal.raise_signal(signum)
            return out

        return signalling

    monkeypatch.setattr(loop, "make_train_step", make_signalling)


def test_sigint_mid_epoch_checkpoints_the_step_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    loop.train_and_evaluate(tiny, straight)
    handler_before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        _signal_after_call(patch, 3, signal.SIGINT)
        with pytest.raises(preemption.Preempted) as info:
            loop.train_and_evaluate(tiny, stopped)
    assert (info.value.step, info.value.signal_name, info.value.exit_code) == (3, "SIGINT", 130)
    assert "Run the same command again to resume from step 3" in str(info.value)
    assert signal.getsignal(signal.SIGINT) is handler_before  # Restored.
    assert Checkpointer(stopped / "checkpoints").all_steps() == [3]
    assert run_log.read(stopped) == []  # Mid-epoch: the resumed run writes epoch 1.

    loop.train_and_evaluate(tiny, stopped)
    assert _without_timing(run_log.read(stopped)) == _without_timing(run_log.read(straight))
    for name in ("params", "batch_stats", "opt_state"):
        jax.tree.map(
            np.testing.assert_array_equal,
            _final_state(stopped)[1][name],
            _final_state(straight)[1][name],
        )


def test_sigterm_on_an_epochs_last_step_writes_its_record_first(tiny, tmp_path, monkeypatch):
    _signal_after_call(monkeypatch, 10, signal.SIGTERM)
    with pytest.raises(preemption.Preempted) as info:
        loop.train_and_evaluate(tiny, tmp_path)
    assert (info.value.step, info.value.exit_code) == (10, 143)
    assert [r["epoch"] for r in run_log.read(tmp_path)] == [1.0]
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 10


def test_stop_requests_restore_handlers_and_a_second_signal_acts_at_once():
    # Python's own SIGINT handler first: an earlier test in the same process may have left
    # another one, which the second signal would then reach instead.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT)
    try:
        _check_stop_requests_and_second_signal(before)
    finally:
        signal.signal(signal.SIGINT, outer)


def _check_stop_requests_and_second_signal(before):
    with preemption.StopRequests() as stop:
        assert not stop.should_stop(1)
        # raise_signal, not os.kill: the handler then runs before the next line (os.kill
        # may be delivered to another of JAX's threads and handled a little later).
        signal.raise_signal(signal.SIGINT)
        assert stop.should_stop(2) and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # The second one: Python's own handler.
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_requests_with_sync_ask_it_and_forward_sigint_as_sigterm():
    seen, counts = [], []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with preemption.StopRequests(sync=lambda count: counts.append(count) or count == 7) as stop:
            assert signal.getsignal(signal.SIGTERM) is not stop._on_signal  # Left to JAX.
            stop.report_start_step(4)
            assert [stop.should_stop(c) for c in (5, 6, 7)] == [False, False, True]
            signal.raise_signal(signal.SIGINT)
            assert seen == [signal.SIGTERM] and stop.exit_code == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert counts == [4, 5, 6, 7]


def test_stop_requests_with_agree_handle_both_signals_and_share_the_flag():
    # Several processes without JAX's preemption service: our handlers, flags shared.
    flags = []
    others = iter([False, False, True])  # Another process has a signal at the third step.
    with preemption.StopRequests(
        agree=lambda flag: flags.append(flag) or flag or next(others)
    ) as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._on_signal
        assert signal.getsignal(signal.SIGINT) == stop._on_signal
        stop.report_start_step(4)  # Nothing to report to.
        assert [stop.should_stop(c) for c in (5, 6, 7)] == [False, False, True]
        assert stop.signal_name.startswith("a stop request") and stop.exit_code == 143
        signal.raise_signal(signal.SIGTERM)  # This process: stops whatever the others say.
        assert stop.should_stop(8) and stop.signal_name == "SIGTERM"
    assert flags == [False, False, False, True]
    with pytest.raises(ValueError, match="not both"):
        preemption.StopRequests(lambda step: False, agree=lambda flag: flag)


def test_preemption_sync_and_any_process_in_one_process():
    from jbn.train import distributed

    assert not distributed.preemption_sync_available()  # No distributed runtime here.
    assert distributed.any_process(True) and not distributed.any_process(False)


def test_stop_requests_outside_the_main_thread_install_nothing():
    results = []

    def run():
        with preemption.StopRequests() as stop:
            results.append((stop._previous, stop.should_stop(1)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert results == [({}, False)]


# --- kill -9 inside an epoch-end evaluation ------------------------------------------------

# A child process with this suite's settings (conftest) whose epoch-end
# evaluation of step ``HOLD_AT`` says so and then waits to be killed.
_HOLD_IN_EVALUATION = """
import sys, time
sys.path.insert(0, {tests!r})
import conftest  # The suite's JAX settings, as in the test process.
from jbn.train import loop

workdir, data_dir, hold_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_evaluate = loop.evaluate


def evaluate(state, *args, **kwargs):
    if int(state.step) == hold_at:
        print(f"evaluating step {{hold_at}}", flush=True)
        time.sleep(3600)  # Killed here.
    return real_evaluate(state, *args, **kwargs)


loop.evaluate = evaluate
overrides = {{"data.data_dir": data_dir, "checkpoint_every_steps": 5, "eval_every_steps": 5}}
loop.train_and_evaluate(conftest.load_config("tiny.py", overrides), workdir)
"""


@pytest.mark.timeout(900)
def test_kill_9_in_the_evaluation_of_an_epoch_end_checkpoint_keeps_its_record(
    tiny, cifar_fixture_dir, tmp_path
):
    # 10 steps per epoch and a checkpoint every 5: the periodic save falls on the epoch end.
    config = overridden(tiny, checkpoint_every_steps=5, eval_every_steps=5)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    loop.train_and_evaluate(config, straight)
    script = _HOLD_IN_EVALUATION.format(tests=str(pathlib.Path(__file__).parent))
    command = [sys.executable, "-c", script, str(killed), str(cifar_fixture_dir), "10"]
    run = _Run(command, tmp_path)
    run.wait_for(lambda: "evaluating step 10" in run.output, "the epoch-end evaluation")
    run.proc.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    # Step 10 is saved only once its record is written; the resume redoes steps 6-10.
    assert Checkpointer(killed / "checkpoints").latest_step() == 5
    loop.train_and_evaluate(config, killed)
    for read in (run_log.read, step_eval.read):
        assert _without_timing(read(killed)) == _without_timing(read(straight))
    assert [r["step"] for r in run_log.read(killed)] == [10, 20]
    _assert_same_run(killed, (_without_timing(run_log.read(straight)), _final_state(straight)))


# --- subprocess: the real train.py ---------------------------------------------------------

# 320 fixture images at batch 16: 20 steps per epoch, 2 epochs.
STEPS_PER_EPOCH = 20


def _command(workdir, data_dir, *extra):
    return train_command(
        workdir, data_dir, "--config.num_epochs=2", "--config.data.batch_size=16", *extra
    )


class _Run:
    """A train.py process started in ``cwd``, its output in a file."""

    def __init__(self, command, cwd):
        self.log = pathlib.Path(cwd) / f"train_{time.monotonic_ns()}.log"
        self._file = open(self.log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            command, cwd=cwd, stdout=self._file, stderr=subprocess.STDOUT, text=True
        )

    @property
    def output(self):
        return self.log.read_text()

    def wait_for(self, condition, what):
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"exited ({self.proc.returncode}) before {what}:\n{self.output}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output}")
            time.sleep(0.01)

    def wait(self):
        try:
            self.proc.wait(timeout=TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._file.close()
        return self.proc.returncode


def _newest_checkpoint(workdir):
    directory = pathlib.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit()]
    return max(steps, default=0)


def _run(command, cwd):
    run = _Run(command, cwd)
    return run.wait(), run.output


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cifar_fixture_dir):
    """One uninterrupted run: its records (without timing) and final state."""
    cwd = tmp_path_factory.mktemp("straight")
    code, output = _run(_command(cwd / "wd", cifar_fixture_dir), cwd)
    assert code == 0, output[-3000:]
    return _without_timing(run_log.read(cwd / "wd")), _final_state(cwd / "wd")


@pytest.mark.timeout(900)
def test_sigterm_mid_epoch_stops_cleanly_and_the_same_command_resumes(
    straight_run, cifar_fixture_dir, tmp_path
):
    workdir = tmp_path / "wd"
    command = _command(workdir, cifar_fixture_dir, "--config.checkpoint_every_steps=1000")
    run = _Run(command, tmp_path)  # Another working directory than the repository.
    # The line comes once the handlers are installed, before the first step compiles.
    run.wait_for(lambda: "Starting at step 0" in run.output, "the start line")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 143, run.output[-3000:]
    match = re.search(
        r"Stopped by SIGTERM after train step (\d+); its checkpoint is in (\S+)\.", run.output
    )
    assert match, run.output[-3000:]
    step = int(match.group(1))
    assert step % STEPS_PER_EPOCH != 0, f"stopped at an epoch end ({step}), not mid-epoch"
    assert match.group(2) == str(workdir / "checkpoints")
    assert Checkpointer(workdir / "checkpoints").latest_step() == step
    assert "Resume with: " in run.output and "Traceback" not in run.output
    assert all(r["step"] < step for r in run_log.read(workdir))

    # Resuming with another model is refused, the checkpoint left as it was.
    code, output = _run(command + ["--config.model.widths=(8,16)"], tmp_path)
    assert code == 2 and "Traceback" not in output, output[-3000:]
    assert f"Cannot resume {workdir}" in output and "model.widths: [4, 8] -> [8, 16]" in output
    assert Checkpointer(workdir / "checkpoints").latest_step() == step

    code, output = _run(command, tmp_path)  # The same command resumes.
    assert code == 0, output[-3000:]
    assert f"Resumed from {workdir / 'checkpoints'} at step {step}." in output
    _assert_same_run(workdir, straight_run)


@pytest.mark.timeout(900)
def test_kill_9_at_a_random_moment_then_resume_matches_a_straight_run(
    straight_run, cifar_fixture_dir, tmp_path
):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    workdir = tmp_path / "wd"
    command = _command(workdir, cifar_fixture_dir, "--config.checkpoint_every_steps=3")
    run = _Run(command, tmp_path)
    # A random checkpoint of the first 30 steps (of 40), then a random moment after it.
    after = 3 * rng.randrange(1, 11)
    # (keep_checkpoints=2: checkpoint `after` itself may be gone when looked for.)
    run.wait_for(lambda: _newest_checkpoint(workdir) >= after, f"checkpoint {after}")
    time.sleep(rng.uniform(0.0, 0.2))
    run.proc.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, f"seed {seed}: the run ended before the kill"

    code, output = _run(command, tmp_path)
    assert code == 0, f"seed {seed}:\n{output[-3000:]}"
    resumed = int(re.search(r"Resumed from \S+ at step (\d+)\.", output).group(1))
    assert resumed >= after, f"seed {seed}"
    _assert_same_run(workdir, straight_run)
