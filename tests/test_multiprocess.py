"""Two processes on 127.0.0.1 (2 fake CPU devices each, gloo) run train.py.

Both processes must finish with identical params and batch stats (jbn.train.loop
checks with multihost_utils.assert_equal and exits non-zero otherwise), equal
to a 1-process run on 4 devices within 1e-5, including across a resume from
a checkpoint written by both processes. SIGTERM to one process stops both
after the same step (JAX's preemption sync, or without that service jbn's own
handlers with the flags shared every step), with a checkpoint of it. Every
process is killed on failure.
"""

import importlib.util
import os
import pathlib
import re
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import load_config
from train_cli import train_command

from jbn.train import distributed, loop
from jbn.train.checkpoint import Checkpointer

TIMEOUT_S = 240


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(workdir, data_dir, max_steps, num_epochs=1):
    return train_command(
        workdir,
        data_dir,
        f"--config.num_epochs={num_epochs}",
        f"--config.max_steps={max_steps}",
        "--config.checkpoint_every_steps=2",
    )


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    return env


def _run_processes(cmds, env):
    """Runs commands concurrently; kills all of them if any fails or times out."""
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in cmds
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
            if proc.returncode != 0:
                raise AssertionError(f"process exited with {proc.returncode}:\n{out[-4000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def _two_process_cmds(workdir, data_dir, max_steps, num_epochs=1):
    port = _free_port()
    return [
        _train_cmd(workdir, data_dir, max_steps, num_epochs)
        + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
        for i in range(2)
    ]


def _two_processes(workdir, data_dir, max_steps):
    return _run_processes(_two_process_cmds(workdir, data_dir, max_steps), _env(2))


def _checkpoint_steps(workdir):
    return [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]


def _restore(workdir, data_dir):
    config = load_config("tiny.py", {"data.data_dir": str(data_dir), "num_epochs": 1})
    mesh = distributed.create_mesh({"data": 1}, devices=jax.devices()[:1])
    target = loop.create_train_state(config, jax.random.key(0), mesh, steps_per_epoch=10)
    with Checkpointer(pathlib.Path(workdir) / loop.CHECKPOINT_DIR) as ckpt:
        state, step = ckpt.restore_latest(target)
    return step, jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


@pytest.mark.timeout(600)
def test_two_processes_match_one_process_on_four_devices(cifar_fixture_dir, tmp_path):
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    # Two processes: 2 steps, then a re-run resumes from the shared checkpoint to step 4.
    first = _two_processes(multi, cifar_fixture_dir, max_steps=2)
    second = _two_processes(multi, cifar_fixture_dir, max_steps=4)
    assert "Resumed from" in second[0] and "agree across 2 processes" in second[0]
    assert "epoch" not in first[1] and "Done:" not in second[1], "only process 0 prints progress"
    assert "Model: SmallBNConvNet" in first[0] and "Model:" not in first[1]
    # Only process 0 writes TensorBoard events: one file per run (written when installed).
    expected_event_files = 2 if importlib.util.find_spec("tensorboardX") else 0
    assert len(list(multi.glob("events.out.tfevents.*"))) == expected_event_files
    _run_processes([_train_cmd(single, cifar_fixture_dir, max_steps=4)], _env(4))

    step_multi, multi_state = _restore(multi, cifar_fixture_dir)
    step_single, single_state = _restore(single, cifar_fixture_dir)
    assert step_multi == step_single == 4
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        multi_state,
        single_state,
    )
    assert (multi / "metrics.jsonl").exists() and (multi / "curves.png").exists()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("service", ["preemption service", "no preemption service"])
def test_sigterm_to_one_process_stops_both_after_the_same_step(
    cifar_fixture_dir, tmp_path, service
):
    workdir = tmp_path / "wd"
    # 1000 steps: far more than run before the preemption sync settles (seconds).
    cmds = _two_process_cmds(workdir, cifar_fixture_dir, max_steps=1000, num_epochs=100)
    env = _env(2)
    if service == "no preemption service":  # No JAX SIGTERM handler: jbn's own, flags shared.
        env["JAX_ENABLE_PREEMPTION_SERVICE"] = "false"
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    files = [open(log, "w") for log in logs]  # noqa: SIM115 - closed below
    procs = [
        subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        for cmd, f in zip(cmds, files, strict=True)
    ]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _checkpoint_steps(workdir):  # Both are training.
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # Process 1 only, not the coordinator.
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for proc, f in zip(procs, files, strict=True):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            f.close()
    outputs = [log.read_text() for log in logs]
    assert codes == [143, 143], [out[-3000:] for out in outputs]
    if service == "preemption service":
        stopped_by = ["a preemption notice .*", "a preemption notice .*"]
    else:  # Process 1 got the signal; process 0 learnt it from the shared flags.
        stopped_by = ["a stop request .*", "SIGTERM"]
    steps = [
        int(re.search(rf"Stopped by {by} after train step (\d+);", out).group(1))
        for by, out in zip(stopped_by, outputs, strict=True)
    ]
    assert steps[0] == steps[1], steps
    step = steps[0]
    assert 2 <= step < 1000
    # Saved by both together: the checkpoint restores (resuming from it is tested above).
    assert _restore(workdir, cifar_fixture_dir)[0] == step
