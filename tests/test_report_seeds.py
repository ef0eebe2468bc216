"""Tests for the seed-aware reports (jbn.experiments.seeds, tables, figures) and the sweep
files of the BatchNorm paper's experiments (fig1_mlp, depth_lr, sigmoid_plain)."""

import json
import pathlib
import runpy
import statistics

import pytest

from jbn.experiments import report, runs, seeds, sweep
from jbn.models import registry
from jbn.train import activation_probe, run_log, step_eval

REPO = pathlib.Path(__file__).resolve().parents[1]
SWEEPS = REPO / "configs" / "sweeps"
PNG = b"\x89PNG\r\n\x1a\n"


def _sweep_file(name):
    return runpy.run_path(str(SWEEPS / name))["get_config"]()


def _rows(text, first_cell):
    return [line for line in text.splitlines() if line.startswith(f"| {first_cell}")]


def test_tiny_sweep_end_to_end_mlp_two_seeds_steps_and_probe(cifar_fixture_dir, tmp_path):
    config = _sweep_file("fig1_mlp.py")
    base = config.base
    base.data.data_dir, base.data.download = str(cifar_fixture_dir), False
    base.num_epochs, base.data.batch_size, base.data.eval_batch_size = 1, 32, 16  # 10 steps.
    base.model.widths = (8, 8, 8)
    base.eval_every_steps, base.probe.every_steps, base.probe.num_examples = 4, 5, 20
    root, out = tmp_path / "runs", tmp_path / "docs"
    only = ["seed0_bn", "seed0_nobn", "seed1_bn", "seed1_nobn"]
    results = sweep.run_sweep(config, root, only=only)
    assert all(r["status"] == "done" and r["step"] == 10 for r in results.values())
    for name in only:
        assert [r["step"] for r in step_eval.read(root / name)] == [0, 4, 8, 10]
        assert [r["step"] for r in activation_probe.read(root / name)] == [0, 5, 10]
    report.write_report(root, out, thresholds=(0.1, 0.2))
    text = (out / report.REPORT_FILE).read_text()

    # The cell rows: seeds, mean (min–max) and spread from the runs' own metrics.
    for cell, use_bn in (("bn", True), ("nobn", False)):
        finals = [run_log.read(root / f"seed{s}_{cell}")[-1]["test_accuracy"] for s in (0, 1)]
        mean, low, high = statistics.fmean(finals), min(finals), max(finals)
        (row,) = _rows(text, f"{cell} |")
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == ["yes" if use_bn else "no", "0.1", "0, 1"]
        assert cells[4] == f"{100 * mean:.2f}% ({100 * low:.2f}–{100 * high:.2f})"
        assert cells[5] == f"{100 * (high - low):.2f}"
    assert "Seed-to-seed spread of the final test accuracy" in text
    assert "## BatchNorm against no BatchNorm" in text
    (comparison,) = _rows(text, "all |")
    assert comparison.endswith("| no |") or comparison.endswith("| **yes** |")
    assert "Every run (seeds 0 and 1): 1 epoch," in text
    assert "Model mlp (widths (8, 8, 8), activation sigmoid)." in text
    assert "Probe: percentiles 15, 50, 85 of `pre_activation_3` (unit 0)" in text
    assert len(_rows(text, "seed0_")) == 2 and len(_rows(text, "seed1_")) == 2
    for plot in (report.STEPS_PLOT, report.PROBE_PLOT):
        assert f"]({plot})" in text and (out / plot).read_bytes()[:8] == PNG
    assert not (out / report.LR_PLOT).exists()  # One learning rate.
    assert str(tmp_path) not in text


def test_fig1_sweep_runs_on_mnist_through_data_name(mnist_fixture_dir, tmp_path):
    """The paper's data set: the same sweep with ``data.name=mnist`` (28 x 28 x 1 digits)."""
    config = _sweep_file("fig1_mlp.py")
    base = config.base
    base.data.name, base.data.data_dir, base.data.download = "mnist", str(mnist_fixture_dir), False
    base.num_epochs, base.data.batch_size, base.data.eval_batch_size = 1, 32, 16  # 8 steps.
    base.eval_every_steps, base.probe.every_steps, base.probe.num_examples = 4, 4, 16
    results = sweep.run_sweep(config, tmp_path, only=["seed0_bn"])
    assert results["seed0_bn"]["status"] == "done" and results["seed0_bn"]["step"] == 8
    assert [r["step"] for r in step_eval.read(tmp_path / "seed0_bn")] == [0, 4, 8]
    assert all(r["test_count"] == 40 for r in step_eval.read(tmp_path / "seed0_bn"))
    assert [r["step"] for r in activation_probe.read(tmp_path / "seed0_bn")] == [0, 4, 8]


def _write_run(root, name, *, use_bn, lr, seed, curve, status="done", step=None, model="mlp"):
    """A run dir with a config, evals every 10 steps (``curve``), one epoch record, a status."""
    workdir = root / name
    workdir.mkdir(parents=True)
    config = runpy.run_path(str(REPO / "configs" / "default.py"))["get_config"]()
    overrides = {"model.use_batch_norm": use_bn, "optim.learning_rate": lr, "seed": seed}
    config = sweep.variant_config(config, {**overrides, "model.name": model})
    config.num_epochs, config.eval_every_steps = 1, 10
    config.data.data_dir = "/some/machine/path"  # Bookkeeping: must not split cells.
    (workdir / "config.json").write_text(config.to_json_best_effort())
    for i, accuracy in enumerate(curve):
        record = {"step": 10 * i, "epoch": i / (len(curve) - 1), "test_accuracy": accuracy}
        run_log.append(workdir, record, step_eval.EVALS_FILE)
    if status == "done":
        final = {"epoch": 1.0, "step": 10 * (len(curve) - 1), "test_accuracy": curve[-1]}
        run_log.append(workdir, {**final, "train_loss": 1.0, "images_per_sec": 10.0})
    status_record = {"status": status, "step": step, "wall_time_s": 20.0 + seed}
    (workdir / sweep.STATUS_FILE).write_text(json.dumps(status_record))


def test_cells_spread_divergence_comparisons_and_lr_plot(tmp_path):
    root = tmp_path / "runs"
    for model in ("mlp", "SmallBNConvNet"):
        for seed in (0, 1):
            bump = 0.02 * seed
            cells = (
                ("bn_lr0.1", True, 0.1, [0.1, 0.3, 0.5 + bump]),
                ("nobn_lr0.1", False, 0.1, [0.1, 0.2, 0.49 + 2 * bump]),
                ("bn_lr1", True, 1.0, [0.1, 0.35, 0.45 - bump]),
            )
            for cell, use_bn, lr, curve in cells:
                name = f"{model}_{cell}_seed{seed}"
                _write_run(root, name, use_bn=use_bn, lr=lr, seed=seed, curve=curve, model=model)
    # Without BN at lr 1 seed 0 diverges at step 15: its step-20 evaluation (NaN) is dropped.
    diverged = {"status": "diverged", "step": 15, "curve": [0.1, 0.25, float("nan")]}
    _write_run(root, "mlp_nobn_lr1_seed0", use_bn=False, lr=1.0, seed=0, **diverged)
    _write_run(root, "mlp_nobn_lr1_seed1", use_bn=False, lr=1.0, seed=1, curve=[0.1, 0.2, 0.3])

    loaded = runs.load_runs(root)
    groups = seeds.group_by_seed(loaded)
    assert len(groups) == 7 and all(len(g.runs) == 2 for g in groups)
    by_name = {g.name: g for g in groups}
    stopped = by_name["mlp_nobn_lr1"]
    assert stopped.finals() == [0.1, 0.3]  # The diverged run counts at chance.
    assert runs.test_curve(stopped.runs[0]) == [(0, 0.1), (10, 0.25)]
    assert runs.steps_to_reach(by_name["mlp_bn_lr1"].runs[0], 0.3) == 10
    assert by_name["mlp_bn_lr0.1"].spread() == pytest.approx(0.02)
    assert seeds.seed_spread(groups) == pytest.approx((0.02, 0.2, 7))

    comparisons = {c.label: c for c in seeds.bn_comparisons(groups)}
    assert sorted(comparisons) == [  # SmallBNConvNet has no cell without BN at lr 1.
        "SmallBNConvNet, lr 0.1",
        "mlp, lr 0.1",
        "mlp, lr 1",
    ]
    # BN 0.50-0.52 vs no BN 0.49-0.53: overlapping ranges, within the spread.
    assert comparisons["mlp, lr 0.1"].exceeds_spread() is False
    # BN 0.43-0.45 vs no BN 0.1 (diverged) - 0.3: disjoint ranges.
    assert comparisons["mlp, lr 1"].exceeds_spread() is True
    assert comparisons["mlp, lr 1"].difference() == pytest.approx(0.44 - 0.2)

    out = tmp_path / "docs"
    notes = tmp_path / "notes.md"
    notes.write_text("What this shows: written by hand.\n")
    report.main([str(root), "--out", str(out), "--thresholds", "0.3,0.5", "--notes", str(notes)])
    text = (out / report.REPORT_FILE).read_text()
    assert text.startswith("# Sweep `runs`\n\nWhat this shows: written by hand.\n\nEvery run")
    # Columns: cell, model, BN, lr, seeds, final, spread, best, steps to 30%, to 50%,
    # diverged, at chance, wall.
    expected_rows = (
        "| mlp_nobn_lr1 | mlp | no | 1 | 0, 1 | 20.00% (10.00–30.00) | 20.00 | 27.50% "
        "| never, 20 | never, never | 1/2 (step 15) | 0/2 | 20 |",
        "| mlp_bn_lr0.1 | mlp | yes | 0.1 | 0, 1 | 51.00% (50.00–52.00) | 2.00 | 51.00% "
        "| 10, 10 | 20, 20 | 0/2 | 0/2 | 20 |",
    )
    for row in expected_rows:
        assert row in text.splitlines()
    assert "| mlp, lr 1 | 44.00% (43.00–45.00), 2 run(s) | " in text
    assert "| +24.00 | 20.00 | **yes** |" in text
    assert "median 2.00 points, largest 20.00, over 7 cells" in text
    for plot in (report.STEPS_PLOT, report.LR_PLOT):
        assert (out / plot).read_bytes()[:8] == PNG
    assert not (out / report.PROBE_PLOT).exists()
    assert "/some/machine/path" not in text


def test_portable_command_hides_machine_paths(tmp_path):
    cwd = tmp_path / "repo"
    (cwd / "runs").mkdir(parents=True)
    command = (
        f"python -m jbn.sweep --sweep configs/s.py --root {cwd / 'runs' / 'x'} "
        "--sweep.base.data.data_dir=/work/shared/data/cifar-10-batches-py --only a,b"
    )
    assert report.portable_command(command, cwd) == (
        "python -m jbn.sweep --sweep configs/s.py --root runs/x "
        "--sweep.base.data.data_dir=/path/to/cifar-10-batches-py --only a,b"
    )
    assert report.portable_command("python -m jbn.report '/a b/runs'", cwd) == (
        "python -m jbn.report /path/to/runs"
    )


def test_paper_sweep_files_cells_and_budgets():
    fig1 = _sweep_file("fig1_mlp.py")
    # Run in name order: seed 0 with and without BN first.
    assert list(fig1.variants)[:2] == ["seed0_bn", "seed0_nobn"] and len(fig1.variants) == 6
    assert {v["seed"] for v in fig1.variants.values()} == {0, 1, 2}
    base = fig1.base
    assert (base.model.name, tuple(base.model.widths), base.model.activation) == (
        "mlp",
        (100, 100, 100),
        "sigmoid",
    )
    assert base.data.batch_size == 60 and not base.data.augment
    assert base.probe.intermediate == "pre_activation_3" and base.eval_every_steps

    depth = _sweep_file("depth_lr.py")
    assert len(depth.variants) == 24
    fields = ("model.name", "model.use_batch_norm", "optim.learning_rate")
    cells = {tuple(v[f] for f in fields) for v in depth.variants.values()}
    assert len(cells) == 12 and {c[2] for c in cells} == {0.01, 0.1, 1.0}
    assert {c[0] for c in cells} == {"plain20", "resnet20"}
    assert all(v["seed"] == 0 for v in list(depth.variants.values())[:12])  # Seed 0 first.
    assert depth.base.data.num_train_examples == 19200 and depth.base.data.batch_size == 64

    sigmoid = _sweep_file("sigmoid_plain.py")
    assert len(sigmoid.variants) == 8 and sigmoid.base.model.activation == "sigmoid"
    assert sigmoid.base.model.name == "plain20"

    # Every variant builds its model, with the sweep's activation.
    for sweep_config in (fig1, depth, sigmoid):
        for overrides in sweep_config.variants.values():
            model = registry.make_model(sweep.variant_config(sweep_config.base, overrides).model)
            assert model.activation == sweep_config.base.model.activation
