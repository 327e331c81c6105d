"""Atomic checkpoints of a DeepSpeed engine plus the trainer's own state.

Layout of `<out_dir>/checkpoints/`:
    step_00000100/state/...        DeepSpeed engine state (model, optimizer, LR schedule; ZeRO shards)
    step_00000100/trainer_state.json   step, tokens seen, data state (JSON: no pickle on our side)
    step_00000100/rng_rank{r}.json     each rank's torch RNG state
    step_00000100/config.yaml          the resolved config of the run
    latest                             one line: the name of the newest complete checkpoint

A checkpoint is written under `.tmp-step_...`, renamed when every rank has finished, and only then is
`latest` replaced (write to a temp file, then os.replace). A kill at any moment leaves `latest` naming
a complete checkpoint, or absent.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import Config, save_config
# Path resolution lives under llmtrain/parallel (readers there must not import the trainer); the old
# names stay importable from here.
from llmtrain.parallel.checkpoint_paths import (LATEST, checkpoint_root, latest_checkpoint,  # noqa: F401
                                                resolve_checkpoint, step_name)
from llmtrain.utils import barrier, rank


def save_checkpoint(runner: Any, cfg: Config, step: int, trainer_state: dict[str, Any]) -> Path:
    """Collective: every rank calls this. Returns the final checkpoint directory."""
    root = checkpoint_root(cfg.out_dir)
    name = step_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    runner.save(tmp)
    _write_json(tmp / f"rng_rank{rank()}.json", _rng_state())
    if rank() == 0:
        save_config(cfg, tmp / "config.yaml")
        _write_json(tmp / "trainer_state.json", trainer_state)
    barrier()
    if rank() == 0:
        _publish(root, tmp, final)
        _prune(root, cfg.checkpoint.keep_last)
    barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    if final.exists():  # the same step saved again after a resume from an older checkpoint
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    pointer = root / f".{LATEST}.tmp"
    with open(pointer, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if (p / "trainer_state.json").is_file())
    current = (root / LATEST).read_text().strip()
    for old in done[:-keep_last]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def remove_partial(out_dir: str | Path) -> None:
    """Delete checkpoints left half-written by a killed run (rank 0, before anything is loaded)."""
    for tmp in checkpoint_root(out_dir).glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(runner: Any, path: Path, load_optimizer: bool = True) -> dict[str, Any]:
    """Collective: restore the runner's state and this rank's RNG; return the trainer state."""
    runner.load(path, load_optimizer=load_optimizer)
    rng_file = path / f"rng_rank{rank()}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved: keep the seeded state
        _set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((path / "trainer_state.json").read_text())


def _rng_state() -> dict[str, Any]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
