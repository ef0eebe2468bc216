"""Suite-wide run modes, loaded by tests/conftest.py as a pytest plugin.

- In CI (the ``CI`` environment variable set, as CI services do), a test
  skipped because an optional package is missing (``pytest.importorskip``:
  PyTorch for the parity tests) fails instead: CI installs every extra, so a
  skip there means a claim went unchecked.
- ``--strict-promotion`` runs the suite with JAX's strictest promotion
  settings, ``jax_numpy_rank_promotion="raise"`` and
  ``jax_numpy_dtype_promotion="strict"``, which careful JAX codebases (and
  Equinox's own tests) turn on: jbn's modules must work under them too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

MISSING_MODULE = "could not import"  # how pytest.importorskip words its skips


def in_ci() -> bool:
    """True when the ``CI`` environment variable is set to anything but 0/false."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def _fail_missing_module_skips(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and in_ci() and MISSING_MODULE in _skip_reason(report):
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = (
            f"{reason}\nCI is set, so this skip fails: CI must install every optional extra "
            "(the README's test command) and run the tests that need them."
        )


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report = yield
    _fail_missing_module_skips(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    _fail_missing_module_skips(report)
    return report


@contextlib.contextmanager
def standard_promotion() -> Iterator[None]:
    """JAX's default promotion rules inside, whatever ``--strict-promotion`` set.

    For the references a test compares jbn against (flax, hand-written maths),
    which are not what the strict pass checks: jbn itself runs outside it.
    """
    import jax

    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--strict-promotion",
        action="store_true",
        help='run under jax_numpy_rank_promotion="raise" and jax_numpy_dtype_promotion="strict"',
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--strict-promotion"):
        import jax

        jax.config.update("jax_numpy_rank_promotion", "raise")
        jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    if config.getoption("--strict-promotion"):
        lines.append('strict promotion: rank_promotion="raise", dtype_promotion="strict"')
    if in_ci():
        lines.append("CI is set: skips for missing optional packages fail")
    return lines
