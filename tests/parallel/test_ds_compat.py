"""The DeepSpeed internals llmtrain relies on exist in the installed DeepSpeed, and a missing one is named."""

import importlib

import pytest

from llmtrain.parallel import ds_compat


def test_installed_deepspeed_has_every_internal_we_use():
    ds_compat.check_internals()  # raises naming each missing module attribute


def test_a_missing_internal_is_named_with_the_fix(monkeypatch):
    engine_cls = importlib.import_module("deepspeed.runtime.engine").DeepSpeedEngine
    monkeypatch.delattr(engine_cls, "clip_fp32_gradients")
    monkeypatch.delattr(importlib.import_module("deepspeed.runtime.zero.utils"), "ZERO_SUPPORTED_OPTIMIZERS")
    with pytest.raises(RuntimeError) as err:
        ds_compat.check_internals()
    msg = str(err.value)
    assert "deepspeed.runtime.engine.DeepSpeedEngine.clip_fp32_gradients" in msg
    assert "deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS" in msg and ds_compat.TESTED in msg
    with pytest.raises(RuntimeError, match="ZERO_SUPPORTED_OPTIMIZERS is gone"):
        ds_compat.allow_zero_optimizer(type("Opt", (), {}))


def test_pyproject_pins_the_tested_range():
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"{ds_compat.TESTED}"' in pyproject
