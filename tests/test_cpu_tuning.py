"""jbn.cpu_tuning: the process settings train.py re-executes with."""

import subprocess
import sys

import pytest

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
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert cpu_tuning.train_step_compiler_options("cpu") == {
        "xla_cpu_use_fusion_emitters": False,
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    }
    # A YNNPACK choice of the user's own in XLA_FLAGS stands (the option would override it).
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=reduce")
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


def test_the_ynn_compile_option_compiles_what_the_xla_flag_compiles(tmp_path):
    # Fresh processes (XLA reads XLA_FLAGS once): a reduction and a convolution
    # with its gradient, compiled under the process flag and under the option.
    script = tmp_path / "compile.py"
    script.write_text(
        "import re, sys, jax, jax.numpy as jnp\n"
        "from jbn import cpu_tuning\n"
        "def loss(x, w):\n"
        "    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',"
        " dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
        "    return jnp.sum(jnp.square(y - jnp.mean(y, (0, 1, 2))))\n"
        "options = cpu_tuning.YNN_FUSION_OPTION if sys.argv[1] == 'option' else {}\n"
        "step = jax.jit(jax.grad(loss, (0, 1)), compiler_options=options)\n"
        "text = step.lower(jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()\n"
        "text = text[text.index('ENTRY'):]\n"
        "print(re.sub(r', metadata=\\{[^}]*\\}', '', text))\n"
    )
    base = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", cpu_tuning.OPT_OUT_ENV: "1"}

    def compiled(mode, env):
        result = subprocess.run(
            [sys.executable, str(script), mode],
            env={**base, **env, "PYTHONPATH": ":".join(sys.path)},
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    under_flag = compiled("flag", {"XLA_FLAGS": cpu_tuning.XLA_CPU_FLAG})
    assert compiled("option", {}) == under_flag
    # By default YNNPACK runs the convolutions too; with the setting XLA's own kernels do.
    assert " convolution(" in under_flag and " convolution(" not in compiled("flag", {})
    assert "__ynn_fusion" in under_flag  # the reductions stay on YNNPACK


def test_tune_allocator_sets_the_thresholds_in_process(tmp_path):
    # 64 MiB buffers allocated, written and freed: with glibc's defaults (dynamic
    # thresholds) and after tune_allocator, counting page faults per buffer.
    script = tmp_path / "alloc.py"
    script.write_text(
        "import ctypes, resource, sys\n"
        "from jbn import cpu_tuning\n"
        "print(cpu_tuning.tune_allocator() if sys.argv[1] == 'tuned' else None)\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.malloc.argtypes = [ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]\n"
        "size = 64 << 20\n"
        "for _ in range(3):\n"
        "    p = libc.malloc(size); libc.memset(p, 1, size); libc.free(p)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20):\n"
        "    p = libc.malloc(size); libc.memset(p, 1, size); libc.free(p)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)\n"
    )

    def faults(mode, env):
        result = subprocess.run(
            [sys.executable, str(script), mode],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), **env},
            capture_output=True,
            text=True,
            check=True,
        )
        applied, per_buffer = result.stdout.split()
        return applied, float(per_buffer)

    applied, tuned = faults("tuned", {})
    if applied != "True":
        pytest.skip("not glibc, or an untested jaxlib release")
    # Measured: 0 faults per buffer tuned; glibc's defaults trim and refault pages.
    assert tuned < 100
    assert faults("default", {})[1] > 10 * max(tuned, 1)
    # As the environment variables do; and the opt-out leaves the defaults.
    assert faults("default", dict(cpu_tuning.MALLOC_ENV))[1] < 100
    assert faults("tuned", {cpu_tuning.OPT_OUT_ENV: "1"})[0] == "False"
