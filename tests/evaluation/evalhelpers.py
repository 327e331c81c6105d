"""Helpers for tests/evaluation, imported by name (not from conftest, which another directory's conftest
module can shadow when the whole suite runs)."""

import pytest


def need_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        pytest.fail("lm-evaluation-harness is not installed: `pip install -e .[eval]` (the dev extra has it)")
