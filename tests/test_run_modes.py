"""The suite's run modes (tests/run_modes.py): CI fails missing-package skips."""

import pytest

INNER = """
import pytest

def test_needs_a_missing_package():
    pytest.importorskip("jbn_no_such_package")

def test_skipped_for_another_reason():
    pytest.skip("not on this platform")
"""

INNER_MODULE_LEVEL = """
import pytest

pytest.importorskip("jbn_no_such_package")

def test_never_collected():
    pass
"""


@pytest.mark.parametrize("ci", ["", "0", "true"])
def test_missing_package_skips_fail_in_ci(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-p", "run_modes", "-p", "no:cacheprovider")
    if ci == "true":
        result.assert_outcomes(failed=1, skipped=1)
        result.stdout.fnmatch_lines(["*CI is set, so this skip fails*"])
    else:
        result.assert_outcomes(skipped=2)


@pytest.mark.parametrize("ci", ["", "1"])
def test_a_module_level_importorskip_is_a_collection_error_in_ci(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_inner=INNER_MODULE_LEVEL)
    result = pytester.runpytest_inprocess("-p", "run_modes", "-p", "no:cacheprovider")
    if ci:
        result.assert_outcomes(errors=1)
        assert result.ret == pytest.ExitCode.INTERRUPTED
    else:
        result.assert_outcomes(skipped=1)
        assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
