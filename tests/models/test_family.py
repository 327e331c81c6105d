"""Model families: the registry's specs, per-family configs that refuse the other family's keys, and the
model / data mismatch caught at load time (exit 2 before any step)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from helpers import ROOT

from llmtrain.config import ConfigError, load_config
from llmtrain.models import ModelConfig, build_model
from llmtrain.models.config import model_config_from_dict
from llmtrain.models.registry import FAMILIES, family_of
from llmtrain.models.spec import Transformer


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_every_family_builds_a_transformer_of_its_config(arch):
    import torch

    family = family_of(arch)
    assert family.name == arch and ModelConfig(arch=arch).__class__ is family.config_class
    with torch.device("meta"):
        model = family.build(family.config_class(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8))
    assert isinstance(model, Transformer) and family_of(model) is family and callable(family.objective())


def test_a_family_config_refuses_the_other_familys_keys():
    with pytest.raises(ConfigError, match=r"model\.pos .*model\.arch=bert does not use it: remove model\.pos"):
        load_config(ROOT / "recipes/bert_debug.yaml", ["model.pos=rope"])
    with pytest.raises(ConfigError, match=r"model\.num_labels .*model\.arch=gpt does not use it"):
        load_config(ROOT / "recipes/gpt_debug.yaml", ["model.num_labels=3"])
    with pytest.raises(ConfigError, match="unknown config key 'model.poss'; did you mean 'model.pos'"):
        load_config(ROOT / "recipes/gpt_debug.yaml", ["model.poss=rope"])


def test_model_and_data_families_must_agree():
    with pytest.raises(
        ConfigError, match=r"data\.sample_kind=bert feeds model\.arch=bert, but .*set data\.sample_kind=causal"
    ):
        load_config(ROOT / "recipes/gpt_debug.yaml", ["data.sample_kind=bert"])
    with pytest.raises(ConfigError, match=r"data\.sample_kind=causal feeds model\.arch=gpt, but .*model\.arch=bert"):
        load_config(ROOT / "recipes/bert_debug.yaml", ["data.sample_kind=causal"])
    with pytest.raises(ConfigError, match=r"model\.num_labels=0: class labels need the classifier"):
        load_config(ROOT / "recipes/bert_finetune_debug.yaml", ["model.num_labels=0"])


def test_a_config_yaml_of_one_shared_model_config_still_loads():
    """Saved configs listed every family's keys; a key another family uses loads when it holds its old
    default (it never did anything here) and is refused otherwise."""
    bert = load_config(ROOT / "recipes/bert_debug.yaml").model
    legacy = {
        **dataclasses.asdict(bert),
        "bias": True,
        "pos": "learned",
        "norm": "layernorm",
        "mlp": "gelu",
        "n_kv_head": None,
        "head_dim": None,
        "rope_theta": 10000.0,
        "rope_scaling": None,
    }
    assert model_config_from_dict(legacy, "config.yaml") == bert
    with pytest.raises(ValueError, match=r"model\.pos is a key of model\.arch=gpt"):
        model_config_from_dict({**legacy, "pos": "rope"}, "config.yaml")
    gpt = load_config(ROOT / "recipes/gpt_debug.yaml").model
    assert model_config_from_dict({**dataclasses.asdict(gpt), "type_vocab_size": 2, "num_labels": 0}, "x") == gpt
    assert type(build_model(bert)).__name__ == "Bert"


@pytest.mark.parametrize(
    "recipe, override, key",
    [("bert_debug", "model.pos=rope", "model.pos"), ("gpt_debug", "data.sample_kind=bert", "data.sample_kind")],
)
def test_the_launcher_exits_2_with_one_line_naming_the_key(recipe, override, key):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launchers/train.py"),
            str(ROOT / f"recipes/{recipe}.yaml"),
            override,
            "out_dir=/nonexistent/never",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0], out.stderr
