"""Per-file checksums (llmtrain/integrity.py): written last, every change to a listed file is named."""

from __future__ import annotations

import json

import pytest

from llmtrain.errors import CheckpointError
from llmtrain.integrity import CHECKSUMS, verify_dir, write_checksums


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "m"
    (d / "universal").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (d / "universal" / "wte.weight.safetensors").write_bytes(b"x" * 1000)
    (d / "config.yaml").write_text("model: {}\n")
    (d / ".config.yaml.tmp").write_text("a temp file is not listed\n")
    write_checksums(d)
    return d


def test_checksums_list_every_file_and_verify(model_dir):
    listed = json.loads((model_dir / CHECKSUMS).read_text())["files"]
    assert sorted(listed) == ["config.yaml", "model.safetensors", "universal/wte.weight.safetensors"]
    assert verify_dir(model_dir) == sorted(listed)
    assert verify_dir(model_dir, only=["universal/"]) == ["universal/wte.weight.safetensors"]
    assert not list(model_dir.glob(".checksums*"))  # the temp file was renamed into place


def _flip16(path):
    raw = bytearray(path.read_bytes())
    for i in range(100, 116):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda d: _flip16(d / "model.safetensors"), "does not match its sha256"),
        (lambda d: (d / "model.safetensors").write_bytes(b"short"), "truncated"),
        (lambda d: (d / "universal" / "wte.weight.safetensors").unlink(), "is missing"),
        (lambda d: (d / CHECKSUMS).unlink(), "written without checksums"),
        (lambda d: (d / CHECKSUMS).write_text("{not json"), "not a valid checksum list"),
        (
            lambda d: (d / CHECKSUMS).write_text(
                json.dumps({"algorithm": "sha256", "files": {"../x": {"size": 1, "sha256": "0"}}})
            ),
            "outside the directory",
        ),
    ],
)
def test_any_damage_is_one_error_naming_the_file_and_the_fix(model_dir, damage, words):
    damage(model_dir)
    with pytest.raises(CheckpointError, match=words) as err:
        verify_dir(model_dir, fix="consolidate it again")
    msg = str(err.value)
    assert "\n" not in msg and str(model_dir) in msg and msg.endswith("consolidate it again")


def test_checksums_can_be_recorded_for_an_older_directory(tmp_path):
    import subprocess
    import sys

    d = tmp_path / "old"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match="python -m llmtrain.integrity"):
        verify_dir(d)
    subprocess.run([sys.executable, "-m", "llmtrain.integrity", str(d)], check=True, capture_output=True)
    assert verify_dir(d) == ["model.safetensors"]
