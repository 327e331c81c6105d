"""Model converters (llmtrain/models/converters.py): a converter defined here, through the public registry.

`gain` adds one trainable parameter, `ln_f.gain` (a per-channel gain after the final norm, initialised
from the seeded RNG): it must train, be checkpointed, resume exactly, and come back by name through
load_model_weights, because every reader rebuilds the model with the checkpoint's converters.
"""

import os
from pathlib import Path

import pytest
import torch
from helpers import TINY, losses, train
from torch import nn

from llmtrain.config import load_config
from llmtrain.errors import UserError
from llmtrain.models import build_model
from llmtrain.models.converters import apply_converters, build_converted_model, register_converter
from llmtrain.parallel.consolidate import load_model_weights

CONVERTER = "test_converters:gain"  # imported and registered on first use, in the training processes too


def gain(model_cfg):
    def convert(model: nn.Module) -> None:
        norm = model.ln_f
        # on the device of the weights it sits beside (meta when a reader only wants names and shapes)
        norm.register_parameter(
            "gain", nn.Parameter(1 + 0.1 * torch.randn(model_cfg.n_embd, device=norm.weight.device))
        )
        norm.register_forward_hook(lambda module, _inputs, out: out * module.gain)

    return convert


def test_registry_order_and_errors():
    cfg = load_config(None, [*TINY, f"model.converters=[{CONVERTER}]"]).model
    register_converter("gain_again", gain)
    register_converter("gain_again", gain)  # the same factory twice is fine
    with pytest.raises(ValueError, match="already registered"):
        register_converter("gain_again", lambda c: None)
    with torch.device("meta"):
        model = build_converted_model(cfg)
    assert list(dict(model.named_parameters()))[-1] == "ln_f.gain" and model.ln_f.gain.is_meta
    with pytest.raises(UserError, match="unknown converter 'nope'.*register_converter"):
        apply_converters(build_model(cfg), load_config(None, ["model.converters=[nope]"]).model)


@pytest.fixture()
def importable(monkeypatch):
    here = Path(__file__).resolve().parent  # this module, and tests/ for its `helpers` import
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))


def test_converter_parameters_train_checkpoint_resume_and_load(tmp_path, importable):
    common = [f"model.converters=[{CONVERTER}]", "train.max_steps=4", "optim.decay_steps=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    proc = train(full, *common)
    assert f"model converters applied: {CONVERTER}" in proc.stdout
    train(part, *common[:1], "train.max_steps=2", "optim.decay_steps=4")
    _, at_2 = load_model_weights(part)
    train(part, *common)  # resumes from step 2
    a, b = losses(full), losses(part)
    assert [b[s] for s in (3, 4)] == [a[s] for s in (3, 4)]  # bit-for-bit in fp32

    cfg, at_4 = load_model_weights(full)
    assert (
        cfg.converters == [CONVERTER] and (full / "checkpoints/step_00000004/universal/ln_f.gain.safetensors").is_file()
    )
    assert not torch.equal(at_4["ln_f.gain"], at_2["ln_f.gain"])  # it trains
    assert torch.equal(at_4["ln_f.gain"], load_model_weights(part)[1]["ln_f.gain"])  # and resumed exactly
    model = build_converted_model(cfg)
    model.load_state_dict(at_4)  # strict: every name, the converter's included
