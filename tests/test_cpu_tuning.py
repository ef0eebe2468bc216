"""jbn.cpu_tuning: the process settings train.py re-executes with."""

import subprocess
import sys

from jbn import cpu_tuning


def test_environment_adds_settings_without_overriding(monkeypatch):
    monkeypatch.setattr(cpu_tuning, "_jaxlib_version", lambda: "0.10.2")
    env = cpu_tuning.environment(
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "MALLOC_MMAP_THRESHOLD_": "1"}
    )
    assert env["MALLOC_MMAP_THRESHOLD_"] == "1"  # the caller's value wins
    assert env["MALLOC_TRIM_THRESHOLD_"] == cpu_tuning.MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {cpu_tuning.XLA_CPU_FLAG}"
    # Idempotent, and a user's own ynn setting is kept.
    assert cpu_tuning.environment(env) == env
    mine = cpu_tuning.environment({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=reduce"})
    assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=reduce"


def test_untested_jaxlib_gets_no_xla_flag(monkeypatch):
    monkeypatch.setattr(cpu_tuning, "_jaxlib_version", lambda: "0.99.0")
    assert "XLA_FLAGS" not in cpu_tuning.environment({})
    assert cpu_tuning.train_step_compiler_options("cpu") == {}
    assert cpu_tuning.init_compiler_options("cpu") == {}


def test_compile_options_only_on_cpu_and_not_when_opted_out(monkeypatch):
    monkeypatch.setattr(cpu_tuning, "_jaxlib_version", lambda: "0.10.2")
    monkeypatch.delenv(cpu_tuning.OPT_OUT_ENV, raising=False)
    assert cpu_tuning.train_step_compiler_options("cpu") == {"xla_cpu_use_fusion_emitters": False}
    assert cpu_tuning.init_compiler_options("cpu") == {"xla_backend_optimization_level": 0}
    assert cpu_tuning.train_step_compiler_options("gpu") == {}
    assert cpu_tuning.init_compiler_options("gpu") == {}
    monkeypatch.setenv(cpu_tuning.OPT_OUT_ENV, "1")
    assert cpu_tuning.train_step_compiler_options("cpu") == {}
    assert cpu_tuning.init_compiler_options("cpu") == {}


def test_reexec_sets_the_environment_once_and_can_be_skipped(tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text(
        "import os\n"
        "from jbn import cpu_tuning\n"
        "cpu_tuning.reexec_tuned()\n"
        "print(os.environ.get('MALLOC_TRIM_THRESHOLD_'))\n"
    )
    base = {"PATH": "/usr/bin:/bin"}

    def run(env):
        result = subprocess.run(
            [sys.executable, str(entry)], env=env, capture_output=True, text=True, check=True
        )
        return result.stdout.strip()

    assert run(base) == cpu_tuning.MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]
    assert run({**base, "JBN_NO_CPU_TUNING": "1"}) == "None"
