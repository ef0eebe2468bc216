"""Tests for jbn.sweep (runner, skip/resume, divergence, CLI) and jbn.report."""

import json
import pathlib
import runpy
import subprocess
import sys

import ml_collections
import pytest

from jbn.experiments import report, sweep
from jbn.train import loop, run_log

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _sweep(data_dir, variants, **base_overrides):
    config = ml_collections.ConfigDict()
    config.base = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    config.base.data.data_dir = str(data_dir)
    config.base.num_epochs = 1  # 10 steps of 32 images on the fixture.
    config.base.update(base_overrides)
    config.variants = ml_collections.ConfigDict(variants, allow_dotted_keys=True)
    return config


def test_runs_variants_records_divergence_and_skips_finished(cifar_fixture_dir, tmp_path):
    config = _sweep(
        cifar_fixture_dir,
        {
            "bn": {"model.use_batch_norm": True, "optim.learning_rate": 0.1},
            "huge_lr": {"model.use_batch_norm": False, "optim.learning_rate": 1e30},
        },
    )
    calls = []

    def counting(cfg, workdir):
        calls.append(workdir.name)
        return loop.train_and_evaluate(cfg, workdir)

    results = sweep.run_sweep(config, tmp_path, train_fn=counting)
    assert calls == ["bn", "huge_lr"]
    assert results["bn"]["status"] == "done" and results["bn"]["step"] == 10
    assert [r["step"] for r in run_log.read(tmp_path / "bn")] == [10]
    assert (
        json.loads((tmp_path / "bn" / "config.json").read_text())["optim"]["learning_rate"] == 0.1
    )
    diverged = sweep.read_status(tmp_path / "huge_lr")
    assert diverged["status"] == "diverged" and "Non-finite" in diverged["message"]
    assert isinstance(diverged["step"], int) and 1 <= diverged["step"] <= 10
    assert diverged["overrides"] == {"model.use_batch_norm": False, "optim.learning_rate": 1e30}

    metrics = tmp_path / "bn" / run_log.METRICS_FILE
    mtime = metrics.stat().st_mtime_ns
    again = sweep.run_sweep(config, tmp_path, train_fn=counting)
    assert calls == ["bn", "huge_lr"]  # Nothing retrained.
    assert all(r["skipped"] for r in again.values())
    assert metrics.stat().st_mtime_ns == mtime


def _fake_train(calls):
    """A train_fn that logs one record per call at the config's final step."""

    def train(cfg, workdir):
        calls.append((workdir.name, cfg.optim.learning_rate))
        steps = cfg.max_steps or 10 * cfg.num_epochs
        record = {"epoch": steps / 10, "step": steps, "test_accuracy": 0.5}
        run_log.append(workdir, record)
        return record

    return train


def test_only_partial_budget_and_resume(tmp_path):
    variants = {f"lr{lr:g}": {"optim.learning_rate": lr} for lr in (0.1, 0.2, 0.3)}
    config = _sweep(tmp_path / "unused", variants, num_epochs=2)
    calls = []
    sweep.run_sweep(config, tmp_path, only=["lr0.3", "lr0.1"], train_fn=_fake_train(calls))
    assert calls == [("lr0.1", 0.1), ("lr0.3", 0.3)]  # File order, subset only.

    short = _sweep(tmp_path / "unused", variants, num_epochs=2, max_steps=5)
    sweep.run_sweep(short, tmp_path, only=["lr0.2"], train_fn=_fake_train(calls))
    assert sweep.read_status(tmp_path / "lr0.2")["step"] == 5
    # Done with max_steps=5 is not done with the full budget: trained again (resumed).
    sweep.run_sweep(config, tmp_path, train_fn=_fake_train(calls))
    assert calls[2:] == [("lr0.2", 0.2), ("lr0.2", 0.2)]
    assert sweep.read_status(tmp_path / "lr0.2")["step"] == 20

    # A run finished outside the sweep (final record, no status) is adopted, not retrained.
    (tmp_path / "outside").mkdir()
    run_log.append(tmp_path / "outside", {"epoch": 2.0, "step": 20, "test_accuracy": 0.7})
    config = _sweep(tmp_path / "unused", {"outside": {"optim.learning_rate": 0.5}}, num_epochs=2)
    result = sweep.run_sweep(config, tmp_path, train_fn=_fake_train(calls))
    assert len(calls) == 4 and result["outside"]["skipped"]
    assert sweep.read_status(tmp_path / "outside")["status"] == "done"


def test_bad_names_raise(tmp_path):
    config = _sweep(tmp_path, {"a": {"optim.learning_rate": 0.1}})
    with pytest.raises(KeyError, match="Unknown variants"):
        sweep.run_sweep(config, tmp_path, only=["b"])
    with pytest.raises(KeyError, match="optim.lr"):
        sweep.variant_config(config.base, {"optim.lr": 0.1})
    resolved = sweep.variant_config(config.base, {"model.virtual_batch_size": 8})
    assert resolved.model.virtual_batch_size == 8 and config.base.model.virtual_batch_size is None


def test_cli_skips_finished_variant_and_logs_command(tmp_path):
    sweep_file = REPO / "configs" / "sweeps" / "bn_vs_lr.py"
    variants = runpy.run_path(str(sweep_file))["get_config"]().variants
    assert len(variants) == 10 and dict(variants["nobn_lr0.4"]) == {
        "model.use_batch_norm": False,
        "optim.learning_rate": 0.4,
    }
    (tmp_path / "bn_lr0.1").mkdir()
    final = {"epoch": 5.0, "step": 1950, "test_accuracy": 0.6}
    status = {"status": "done", "step": 1950, "final": final}
    (tmp_path / "bn_lr0.1" / sweep.STATUS_FILE).write_text(json.dumps(status))
    cmd = [sys.executable, "-m", "jbn.sweep", f"--sweep={sweep_file}", f"--root={tmp_path}"]
    cmd += ["--only=bn_lr0.1", "--sweep.base.data.data_dir=/nonexistent"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bn_lr0.1 skipped, already done at step 1950" in result.stdout
    (entry,) = [json.loads(line) for line in (tmp_path / sweep.SWEEP_LOG_FILE).open()]
    assert entry["skipped"] == ["bn_lr0.1"] and entry["trained"] == []
    assert entry["command"].startswith("python -m jbn.sweep --sweep=")

    # An invocation stopped by an error is logged too (its wall time counts).
    cmd[-2] = "--only=no_such_variant"
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Unknown variants" in result.stderr
    entries = [json.loads(line) for line in (tmp_path / sweep.SWEEP_LOG_FILE).open()]
    assert len(entries) == 2 and "Unknown variants" in entries[1]["error"]


def _write_run(root, name, use_bn, lr, accs, speeds, status, step=None, **overrides):
    workdir = root / name
    workdir.mkdir(parents=True)
    config = runpy.run_path(str(REPO / "configs" / "default.py"))["get_config"]()
    config.model.use_batch_norm, config.optim.learning_rate, config.num_epochs = use_bn, lr, 4
    config = sweep.variant_config(config, overrides)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    for epoch, (acc, speed) in enumerate(zip(accs, speeds, strict=True), 1):
        record = {"epoch": float(epoch), "step": 390 * epoch, "test_accuracy": acc}
        record.update(train_loss=2.0 / epoch, images_per_sec=speed)
        run_log.append(workdir, record)
    (workdir / sweep.STATUS_FILE).write_text(json.dumps({"status": status, "step": step}))


def test_report_table_numbers_and_plots(tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "nobn_lr1", False, 1.0, [], [], "diverged", step=7)
    _write_run(root, "nobn_lr0.1", False, 0.1, [0.4, 0.55, 0.61, 0.6], [90, 110, 100, 95], "done")
    _write_run(root, "bn_lr0.1", True, 0.1, [0.5, 0.62, 0.66, 0.64], [100, 300, 200, 400], "done")
    _write_run(root, "bn_lr0.4", True, 0.4, [0.3, 0.65], [10, 20], "unfinished")
    _write_run(root, "bn_lr1", True, 1.0, [0.3, 0.1], [10, 30], "done")
    log = {
        "command": "python -m jbn.sweep --sweep=s.py --root=runs "
        "--sweep.base.data.data_dir=/home/someone/data/cifar-10-batches-py",
        "wall_time_s": 61.0,
    }
    failed = {**log, "wall_time_s": 2.0, "error": "KeyError()"}
    (root / sweep.SWEEP_LOG_FILE).write_text(json.dumps(log) + "\n" + json.dumps(failed) + "\n")
    out = tmp_path / "docs"
    report.main([str(root), "--out", str(out)])

    text = (out / report.REPORT_FILE).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert rows == [
        "| bn_lr0.1 | yes | 0.1 | 64.00% | 66.00% | 2 | 3 | no | 250 |",
        "| bn_lr0.4 | yes | 0.4 | – | 65.00% | 2 | 2 | unfinished | 15 |",
        "| bn_lr1 | yes | 1 | 10.00% | 30.00% | never | never | no, at chance | 20 |",
        "| nobn_lr0.1 | no | 0.1 | 60.00% | 61.00% | 3 | never | no | 98 |",
        "| nobn_lr1 | no | 1 | – | – | never | never | yes (step 7) | – |",
    ]
    assert "Every run: seed 0, 4 epochs, batch 128" in text
    assert "Sweep wall time: 63 s over 2 invocation(s), 1 stopped by an error." in text
    # The sweep's command, without the machine's data path.
    assert "/home/someone" not in text
    assert (
        "python -m jbn.sweep --sweep=s.py --root=runs "
        "--sweep.base.data.data_dir=/path/to/cifar-10-batches-py"
    ) in text
    # Every absolute path outside the working directory becomes a placeholder.
    assert "python -m jbn.report /path/to/runs --out /path/to/docs" in text
    assert str(tmp_path) not in text
    for name in (report.ACCURACY_PLOT, report.LOSS_PLOT):
        assert f"]({name})" in text
        assert (out / name).read_bytes()[:8] == PNG
    assert report.epochs_to_reach([{"epoch": 0.5, "test_accuracy": 0.6}], 0.6) == 0.5


def test_portable_command_hides_absolute_paths():
    assert (
        report.portable_command("python train.py --config.data.data_dir /srv/c10 --workdir /w")
        == "python train.py --config.data.data_dir /path/to/c10 --workdir /path/to/w"
    )
    relative = "python train.py --config.data.data_dir=data/cifar"
    assert report.portable_command(relative) == relative


def test_report_shows_batch_columns_when_they_vary(tmp_path):
    sweep_file = REPO / "configs" / "sweeps" / "ghost_bn.py"
    variants = runpy.run_path(str(sweep_file))["get_config"]().variants
    assert list(variants) == ["b128", "b128_ghost32", "b512", "b512_ghost128"]
    _write_run(tmp_path, "b128", True, 0.1, [0.6], [50], "done")
    ghost = {"data.batch_size": 512, "model.virtual_batch_size": 128}
    _write_run(tmp_path, "b512_ghost128", True, 0.4, [0.7], [60], "done", **ghost)
    table = report.markdown_table(report.load_runs(tmp_path))
    assert table.splitlines()[0].startswith("| variant | BN | peak lr | batch | ghost batch |")
    assert "| b128 | yes | 0.1 | 128 | – | 60.00% |" in table
    assert "| b512_ghost128 | yes | 0.4 | 512 | 128 | 70.00% |" in table
    report.write_report(tmp_path, tmp_path / "out")
    assert (tmp_path / "out" / report.ACCURACY_PLOT).read_bytes()[:8] == PNG


def test_a_bad_variant_stops_the_sweep_before_anything_trains(tmp_path):
    from jbn.train import config_schema

    variants = {"good": {"optim.learning_rate": 0.1}, "bad": {"optim.learning_rate": -1.0}}
    calls = []
    with pytest.raises(config_schema.ConfigError) as info:
        sweep.run_sweep(_sweep(tmp_path, variants), tmp_path, train_fn=_fake_train(calls))
    assert info.value.problems == [
        "variant bad: config.optim.learning_rate=-1.0: must be a finite number >= 0."
    ]
    assert calls == []
