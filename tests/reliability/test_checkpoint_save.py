"""Saving and reading checkpoints in-process (no engine, no launcher): what is written, what is refused.

The runner and engine are stand-ins: save_checkpoint only needs `runner.save(dir)` and the optimizer and
module of `runner.engine`; load_checkpoint only `runner.load(dir)`."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import ROOT, TINY

from llmtrain.config import load_config
from llmtrain.errors import CheckpointError
from llmtrain.integrity import write_checksums
from llmtrain.train import checkpoint as ckpt


class FakeRunner:
    """Writes one universal file, like a runner; `fail` raises that OSError from save instead."""

    def __init__(self, finite: bool = True, fail: OSError | None = None):
        module = torch.nn.Linear(2, 2)
        if not finite:
            with torch.no_grad():
                module.weight[0, 0] = float("nan")
        self.engine = SimpleNamespace(module=module, optimizer=torch.optim.AdamW(module.parameters()))
        self.fail, self.loaded = fail, None

    def save(self, directory: Path) -> None:
        if self.fail is not None:
            raise self.fail
        (directory / "universal").mkdir()
        (directory / "universal" / "weight.safetensors").write_bytes(b"w" * 100)
        (directory / "universal" / "meta.json").write_text("{}")

    def load(self, directory: Path, load_optimizer: bool = True) -> None:
        self.loaded = directory


@pytest.fixture
def cfg(tmp_path):
    return load_config(
        ROOT / "recipes" / "gpt_debug.yaml", [*TINY, f"out_dir={tmp_path / 'run'}", "checkpoint.keep_last=1"]
    )


def _save(cfg, step, runner=None):
    return ckpt.save_checkpoint(runner or FakeRunner(), cfg, step, {"step": step, "tokens_seen": 64 * step})


def test_a_checkpoint_lists_every_file_and_resumes_only_after_verifying(cfg):
    path = _save(cfg, 2)
    listed = json.loads((path / "checksums.json").read_text())["files"]
    assert sorted(listed) == [
        "config.yaml",
        "rng_rank0.json",
        "trainer_state.json",
        "universal/meta.json",
        "universal/weight.safetensors",
    ]
    runner = FakeRunner()
    assert ckpt.load_checkpoint(runner, path)["step"] == 2 and runner.loaded == path


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: (p / "universal" / "weight.safetensors").write_bytes(b"w" * 99), "truncated"),
        (lambda p: (p / "universal" / "weight.safetensors").write_bytes(b""), "truncated"),
        (lambda p: (p / "universal" / "weight.safetensors").write_bytes(b"x" + b"w" * 99), "does not match"),
        (lambda p: (p / "universal" / "weight.safetensors").unlink(), "is missing"),
        (lambda p: (p / "rng_rank0.json").write_text("{bad"), "truncated or changed"),
        (lambda p: (p / "trainer_state.json").write_text("{bad"), "truncated or changed"),
        (lambda p: (p / "checksums.json").unlink(), "checksums.json is missing"),
    ],
)
def test_damaged_files_refuse_the_resume_naming_the_file(cfg, damage, words):
    path = _save(cfg, 2)
    damage(path)
    runner = FakeRunner()
    with pytest.raises(CheckpointError, match=words) as err:
        ckpt.load_checkpoint(runner, path)
    assert str(path) in str(err.value) and "train.resume=" in str(err.value) and "\n" not in str(err.value)
    assert runner.loaded is None  # refused before anything was read into the engine


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("rng_rank0.json", '{"torch": "AAAA"}', "does not hold a torch RNG state"),
        ("rng_rank0.json", "[1, 2]", "does not hold a torch RNG state"),
        ("trainer_state.json", "[1, 2]", "not a JSON object"),
        ("trainer_state.json", '{"tokens_seen": 1}', "lacks step"),
        ("trainer_state.json", "not json", "not valid JSON"),
    ],
)
def test_malformed_json_with_matching_checksums_is_one_error(cfg, name, text, words):
    """Written that way (e.g. by a bug or by hand, checksums recomputed): still one line naming the file."""
    path = _save(cfg, 2)
    (path / name).write_text(text)
    write_checksums(path)
    with pytest.raises(CheckpointError, match=words) as err:
        ckpt.load_checkpoint(FakeRunner(), path)
    assert str(path / name) in str(err.value)


@pytest.mark.parametrize("text, words", [("model: [unclosed", "not valid YAML"), ("just text", "no model section")])
def test_a_bad_config_yaml_in_the_checkpoint_is_one_error(cfg, text, words):
    path = _save(cfg, 2)
    (path / "config.yaml").write_text(text)
    write_checksums(path)
    with pytest.raises(CheckpointError, match=words) as err:
        ckpt.resume_changes(cfg, path)
    assert str(path / "config.yaml") in str(err.value)


def test_non_finite_state_is_never_written(cfg):
    good = _save(cfg, 2)
    assert _save(cfg, 3, FakeRunner(finite=False)) is None
    root = good.parent
    assert (root / "latest").read_text().strip() == good.name
    assert not (root / "step_00000003").exists() and not list(root.glob(".tmp-*"))


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device", "universal/x.safetensors"),
        PermissionError(errno.EACCES, "Permission denied", "state"),
        OSError(errno.EROFS, "Read-only file system", "state"),
    ],
)
def test_a_failed_write_publishes_nothing_and_names_the_file(cfg, error):
    good = _save(cfg, 2)
    with pytest.raises(CheckpointError) as err:
        _save(cfg, 4, FakeRunner(fail=error))
    msg = str(err.value)
    assert error.filename in msg and error.strerror in msg and "free space" in msg and "\n" not in msg
    root = good.parent
    assert (root / "latest").read_text().strip() == good.name and not list(root.glob(".tmp-*"))


def test_pruning_keeps_the_newest_good_checkpoint(cfg):
    """keep_last=1: a later unconfirmed checkpoint does not rotate the good one out; divergence falls back."""
    _save(cfg, 2)
    ckpt.confirm_good(cfg.out_dir, step=7, finite_steps=5, window=5)  # steps 3..7 finite: step 2 is good
    assert ckpt.good_checkpoint(cfg.out_dir).name == "step_00000002"
    _save(cfg, 8)
    ckpt.confirm_good(cfg.out_dir, step=9, finite_steps=1, window=5)  # too soon for step 8
    _save(cfg, 10)
    root = ckpt.checkpoint_root(cfg.out_dir)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000010"]
    assert ckpt.fall_back_to_good(cfg.out_dir).name == "step_00000002"
    assert (root / "latest").read_text().strip() == "step_00000002"


def test_with_no_good_checkpoint_a_divergence_removes_latest(cfg):
    _save(cfg, 1)
    assert ckpt.fall_back_to_good(cfg.out_dir) is None
    assert ckpt.latest_checkpoint(cfg.out_dir) is None  # the rerun starts afresh


def test_changed_keys_are_applied_or_refused_with_the_reason(cfg, tmp_path):
    path = _save(cfg, 2)
    changed = load_config(
        ROOT / "recipes" / "gpt_debug.yaml",
        [
            *TINY,
            f"out_dir={tmp_path / 'other'}",
            "checkpoint.keep_last=1",
            "optim.lr=0.5",
            "train.max_steps=900",
            "parallel.zero_stage=2",
            "train.grad_clip=0.5",
        ],
    )
    applied = ckpt.resume_changes(changed, path)
    assert sorted(a.split()[0] for a in applied) == [
        "optim.lr",
        "parallel.zero_stage",
        "train.grad_clip",
        "train.max_steps",
    ]
    bad = load_config(
        ROOT / "recipes" / "gpt_debug.yaml",
        [
            *TINY,
            f"out_dir={cfg.out_dir}",
            "checkpoint.keep_last=1",
            "model.n_layer=1",
            "train.seed=7",
            "data.tokenizer=gpt2",
            "optim.lr=0.5",
            "parallel.zero_stage=2",
        ],
    )
    with pytest.raises(CheckpointError) as err:
        ckpt.resume_changes(bad, path)
    msg = str(err.value)
    for key in ("model.n_layer=1", "train.seed=7", "data.tokenizer='gpt2'"):
        assert key in msg
    assert "optim.lr" not in msg and "parallel" not in msg and "architecture" in msg and "\n" not in msg


def test_a_key_newer_than_the_checkpoint_counts_as_its_default(cfg):
    """A checkpoint written before a config field existed still resumes (the field at its default)."""
    path = _save(cfg, 2)
    saved = yaml.safe_load((path / "config.yaml").read_text())
    del saved["model"]["rope_theta"], saved["train"]["prefetch"]
    saved["train"]["a_key_this_version_dropped"] = 3
    (path / "config.yaml").write_text(yaml.safe_dump(saved))
    write_checksums(path)
    assert ckpt.resume_changes(cfg, path) == []
