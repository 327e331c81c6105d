"""The one model-directory writer (consolidate, prune, import-hf): atomic, checksummed, refuses to clobber."""

import pytest
import torch
from helpers import TINY

from llmtrain.config import load_config
from llmtrain.errors import UserError
from llmtrain.integrity import verify_dir
from llmtrain.model_dir import write_model, writing
from llmtrain.models import build_model
from llmtrain.parallel.consolidate import load_model_weights


def _model():
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights()
    return cfg, model


def test_written_directory_loads_and_carries_checksums(tmp_path):
    cfg, model = _model()
    out = write_model(tmp_path / "m", cfg, model, {"prune.json": {"a": 1}})
    verify_dir(out)  # checksums.json covers model.safetensors, config.yaml, prune.json
    model_cfg, weights = load_model_weights(out)
    assert model_cfg == cfg.model
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp directory left beside it


def test_non_empty_output_is_refused_unless_replaced(tmp_path):
    cfg, model = _model()
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"exists and is not empty; .*--replace"):
        write_model(out, cfg, model)
    assert (out / "keep.txt").read_text() == "mine"
    write_model(out, cfg, model, replace=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_a_failed_write_leaves_the_old_output(tmp_path):
    cfg, model = _model()
    out = write_model(tmp_path / "m", cfg, model)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with writing(out, replace=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
