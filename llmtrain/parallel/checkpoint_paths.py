"""Where checkpoints live and which one to read: path resolution only, no engine and no trainer.

Layout of `<out_dir>/checkpoints/` (written by llmtrain/train/checkpoint.py):
    step_00000100/                 one complete checkpoint (trainer_state.json marks it complete)
    latest                         one line: the name of the newest complete checkpoint
    good                           one line: the newest checkpoint confirmed good (see `good_checkpoint`)

Readers (resume, `consolidate`, `eval`, `init_from`, distillation teachers) go through
`resolve_checkpoint`, so every one of them accepts a run directory, its `checkpoints/` folder or one
step folder.
"""

from __future__ import annotations

from pathlib import Path

from llmtrain.errors import CheckpointError

LATEST = "latest"
GOOD = "good"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a `checkpoints/` directory or a run directory; return a complete checkpoint.

    Raises ValueError saying what was expected when nothing complete is found.
    """
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            target = root / (root / LATEST).read_text().strip()
            if (target / "trainer_state.json").is_file():
                return target
            raise CheckpointError(
                f"{root / LATEST} names {target.name}, which is missing or incomplete; "
                f"point train.resume at an older complete checkpoint under {root}"
            )
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; pass a checkpoint or run directory")
    raise CheckpointError(
        f"{path} holds no complete checkpoint (no trainer_state.json, no 'latest' pointer); "
        f"pass a run directory, its checkpoints/ folder or one step_* folder inside it"
    )


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint `latest` points to under out_dir, or None when there is none."""
    root = checkpoint_root(out_dir)
    if not (root / LATEST).is_file():
        return None
    return resolve_checkpoint(root)


def good_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint confirmed good under out_dir, or None.

    The rule: a checkpoint is good once the train.max_nonfinite_steps steps after it all ended with a
    finite loss on every rank (the same window that declares a divergence), or when it is the final
    checkpoint of a run that completed with a finite last step. A checkpoint whose parameters or optimizer
    state are not finite is never written at all. After a divergence `latest` is moved back to this one,
    so rerunning (with a lower optim.lr) continues from weights that trained finitely."""
    pointer = checkpoint_root(out_dir) / GOOD
    if not pointer.is_file():
        return None
    target = pointer.parent / pointer.read_text().strip()
    return target if (target / "trainer_state.json").is_file() else None


def step_of(name: str) -> int | None:
    """The step of a `step_*` checkpoint directory name, or None for other names."""
    head, _, digits = name.partition("_")
    return int(digits) if head == "step" and digits.isdigit() else None
