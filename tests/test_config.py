"""Config strictness, precedence and layout validation."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmtrain.config import ConfigError, derive, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_precedence_cli_over_yaml_over_size_over_defaults(tmp_path):
    recipe = write(tmp_path, "model: {name: gpt_125m, n_layer: 3}\ntrain: {max_steps: 7, seq_len: 64}\n")
    cfg = load_config(recipe, ["train.max_steps=9", "optim.lr=3e-4"])
    assert cfg.train.max_steps == 9  # CLI beats YAML
    assert cfg.train.seq_len == 64  # YAML beats defaults
    assert cfg.model.n_layer == 3  # YAML beats the named size
    assert cfg.model.n_embd == 768  # named size beats defaults
    assert cfg.optim.lr == pytest.approx(3e-4)  # '3e-4' (a YAML string) coerced to float
    assert cfg.train.micro_batch_size == 8  # default


def test_unknown_key_names_key_and_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*'train.max_steps'"):
        load_config(write(tmp_path, "train: {max_step: 3}\n"))
    with pytest.raises(ConfigError, match=r"'optim.lr'"):
        load_config(None, ["optim.lrr=1"])


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.max_steps' must be of type int"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"'precision' must be one of fp32, bf16, fp16, bf16-autocast"):
        load_config(None, ["precision=fp8"])
    with pytest.raises(ConfigError, match=r"'log.wandb' must be of type bool"):
        load_config(None, ["log.wandb=3"])


def test_unknown_model_size_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model.name 'gpt_125'.*gpt_125m"):
        load_config(None, ["model.name=gpt_125"])


def test_batch_divisibility_says_what_to_change():
    cfg = load_config(None, ["train.global_batch_size=12", "train.micro_batch_size=4"])
    assert derive(cfg, 1).grad_accum == 3
    with pytest.raises(ConfigError, match=r"not divisible by train.micro_batch_size \* data-parallel size = 4\*2"):
        derive(cfg, 2)
    with pytest.raises(ConfigError, match=r"not divisible by parallel.tp\*parallel.pp"):
        derive(load_config(None, ["parallel.tp=2"]), 3)


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="seq_len"):
        load_config(None, ["train.seq_len=100000"])
    with pytest.raises(ConfigError, match="offload_params needs parallel.zero_stage=3"):
        load_config(None, ["parallel.offload_params=true", "parallel.zero_stage=2"])
    with pytest.raises(ConfigError, match="zero_stage must be 0, 1, 2 or 3"):
        load_config(None, ["parallel.zero_stage=4"])


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    raw = yaml.safe_load(recipe.read_text())
    if "out_dir" in raw:
        assert cfg.out_dir == raw["out_dir"]
    derive(cfg, cfg.parallel.tp * cfg.parallel.pp)  # the smallest world it can run on


def test_cli_error_exit_code_2_one_line_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launchers" / "train.py"),
            str(ROOT / "recipes" / "gpt_debug.yaml"),
            "train.max_stepz=5",
            f"out_dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown config key 'train.max_stepz'; did you mean 'train.max_steps'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a rejected config
