"""Atomic checkpoints of a DeepSpeed engine plus the trainer's own state.

Layout of `<out_dir>/checkpoints/`:
    step_00000100/state/...        DeepSpeed engine state (model, optimizer, LR schedule; ZeRO shards)
    step_00000100/trainer_state.json   step, tokens seen, data state (JSON: no pickle on our side)
    step_00000100/rng_rank{r}.json     each rank's torch RNG state
    step_00000100/config.yaml          the resolved config of the run
    step_00000100/universal/...        layout-free fp32 weights + Adam moments (safetensors) + meta.json
    step_00000100/checksums.json       sha256 of every file above, written last (llmtrain/integrity.py)
    latest                             one line: the name of the newest complete checkpoint
    good                               one line: the newest checkpoint confirmed good (checkpoint_paths.py)

A checkpoint is written under `.tmp-step_...`, renamed when every rank has finished, and only then is
`latest` replaced (write to a temp file, then os.replace). A kill at any moment leaves `latest` naming
a complete checkpoint, or absent. A checkpoint whose parameters or optimizer state are not finite is not
written; a write that fails on any rank (disk full, read-only) publishes nothing and raises one
CheckpointError on every rank.

Resuming reads only JSON, YAML and safetensors, after checking them against checksums.json: DeepSpeed's
`state/*.pt` pickles are never loaded (llmtrain/parallel/runner.py load_engine).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmtrain.config import Config, save_config
from llmtrain.errors import CheckpointError
from llmtrain.integrity import digest_files, list_files, listed_files, verify_files, write_checksums

# Path resolution lives under llmtrain/parallel (readers there must not import the trainer); the old
# names stay importable from here.
from llmtrain.parallel.checkpoint_paths import (
    GOOD,
    LATEST,
    checkpoint_root,
    good_checkpoint,  # noqa: F401
    latest_checkpoint,  # noqa: F401
    resolve_checkpoint,  # noqa: F401
    step_name,
    step_of,
)
from llmtrain.utils import barrier, print0, rank, world_size

if TYPE_CHECKING:
    from llmtrain.parallel.runner import Runner


def save_checkpoint(runner: Runner, cfg: Config, step: int, trainer_state: dict[str, Any]) -> Path | None:
    """Collective: every rank calls this. Returns the final checkpoint directory, or None when the model
    or optimizer state is not finite (nothing is written, `latest` unchanged)."""
    from llmtrain.parallel.engine import optimizer_state_finite

    root = checkpoint_root(cfg.out_dir)
    name = step_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    if not _all_ranks(optimizer_state_finite(runner.engine)):
        print0(
            f"checkpoint {name} not written: parameters or optimizer state are not finite; "
            f"{root / LATEST} keeps naming the last finite one"
        )
        return None

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write() -> None:
        runner.save(tmp)
        _write_json(tmp / f"rng_rank{rank()}.json", _rng_state())
        if rank() == 0:
            save_config(cfg, tmp / "config.yaml")
            _write_json(tmp / "trainer_state.json", trainer_state)

    _collectively(prepare if rank() == 0 else None, tmp)
    _collectively(write, tmp)
    digests = _hash_share(tmp)
    _collectively((lambda: _publish(root, tmp, final, digests)) if rank() == 0 else None, tmp)
    if rank() == 0:
        _prune(root, cfg.checkpoint.keep_last)
    barrier()
    return final


def _collectively(action: Callable[[], None] | None, tmp: Path) -> None:
    """Run `action` (None: nothing on this rank) and agree on the outcome: an OSError on any rank (disk
    full, read-only or missing out_dir, a permission) removes the partial checkpoint and raises the same
    one-line CheckpointError on every rank, so no rank waits for a peer that gave up."""
    error = ""
    try:
        if action is not None:
            action()
    except (OSError, RuntimeError) as exc:
        error = _write_failure(exc, tmp)
        if not error:
            raise
    errors = _gather(error)
    first = next((e for e in errors if e), None)
    if first is None:
        return
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(
        f"cannot write checkpoint {tmp.name.removeprefix('.tmp-')}: {first}; free space on "
        f"that filesystem or make out_dir writable (or choose another out_dir), then rerun "
        f"to resume from {tmp.parent / LATEST}"
    )


def _write_failure(exc: BaseException, tmp: Path) -> str:
    """'file: reason' for a failed write, '' for anything else (a bug keeps its traceback). torch.save
    reports a full disk or a file-size limit as a RuntimeError from its zip writer: found by the frame."""
    if isinstance(exc, OSError):
        return f"{exc.filename or tmp}: {exc.strerror or exc}"
    tb, target = exc.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "save" and frame.f_code.co_filename.endswith("torch/serialization.py"):
            target = frame.f_locals.get("f")
        tb = tb.tb_next
    if target is None:
        return ""
    return f"{target}: torch.save could not write it ({str(exc).splitlines()[0][:120]}), is the disk full?"


def _hash_share(tmp: Path) -> dict[str, Any]:
    """sha256 of every file of the new checkpoint, each rank hashing a share; rank 0 gets them all."""
    names = list_files(tmp) if rank() == 0 else []
    names = _broadcast(names)
    mine = {}
    try:
        mine = digest_files(tmp, names[rank() :: world_size()])
    except OSError:
        pass  # rank 0 hashes what is missing when it writes checksums.json
    merged: dict[str, Any] = {}
    for part in _gather(mine):
        merged.update(part)
    return merged


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_ranks(flag: bool) -> bool:
    return all(_gather(bool(flag)))


def _publish(root: Path, tmp: Path, final: Path, digests: dict[str, Any]) -> None:
    write_checksums(tmp, digests)  # last: a directory with checksums.json is complete
    if final.exists():  # the same step saved again after a resume from an older checkpoint
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _point(root, LATEST, final.name)


def _point(root: Path, pointer: str, name: str | None) -> None:
    """Atomically make `root/pointer` name `name` (None: remove the pointer)."""
    if name is None:
        (root / pointer).unlink(missing_ok=True)
        return
    tmp = root / f".{pointer}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / pointer)


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest keep_last checkpoints, and always the ones `latest` and `good` name."""
    done = sorted(p for p in root.glob("step_*") if (p / "trainer_state.json").is_file())
    keep = {(root / p).read_text().strip() for p in (LATEST, GOOD) if (root / p).is_file()}
    for old in done[:-keep_last]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def confirm_good(out_dir: str | Path, step: int, finite_steps: int, window: int) -> None:
    """Rank 0, after each step: the newest checkpoint followed by `window` finite steps becomes `good`.

    `finite_steps`: how many steps up to `step` ended finite in a row (counted from the resume point)."""
    if rank() != 0 or finite_steps < window:
        return
    root = checkpoint_root(out_dir)
    good = good_checkpoint(out_dir)
    good_step = step_of(good.name) if good is not None else None
    floor = good_step if good_step is not None else -1
    ready = [
        s
        for p in root.glob("step_*")
        if (s := step_of(p.name)) is not None
        and floor < s <= step - window
        and step - s <= finite_steps
        and (p / "trainer_state.json").is_file()
    ]
    if ready:
        _point(root, GOOD, step_name(max(ready)))


def mark_good(path: Path) -> None:
    """Rank 0: `path` (the final checkpoint of a run that completed finitely) is good."""
    if rank() == 0:
        _point(path.parent, GOOD, path.name)


def fall_back_to_good(out_dir: str | Path) -> Path | None:
    """After a divergence (every rank calls it): `latest` is moved back to the good checkpoint, or removed
    when none is good yet, so that rerunning continues from weights that trained finitely. Returns it."""
    good = good_checkpoint(out_dir)
    if rank() == 0 and checkpoint_root(out_dir).is_dir():
        _point(checkpoint_root(out_dir), LATEST, good.name if good is not None else None)
    return good


def remove_partial(out_dir: str | Path) -> None:
    """Delete checkpoints left half-written by a killed run (rank 0, before anything is loaded)."""
    for tmp in checkpoint_root(out_dir).glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


# What a resume reads: verified against checksums.json first (DeepSpeed's state/ is never read)
RESUME_FILES = ("universal/", "trainer_state.json", "rng_rank", "config.yaml")


def verify_checkpoint(path: Path) -> None:
    """Collective: check the files a resume reads against checksums.json, each rank a share of them."""
    fix = f"resume from an older checkpoint (train.resume={path.parent}/step_...) or restore {path.name} from a copy"
    error = ""
    try:
        names = [n for n in listed_files(path, fix) if n.startswith(RESUME_FILES)]
        verify_files(path, names[rank() :: world_size()], fix)
    except CheckpointError as exc:
        error = str(exc)
    first = next((e for e in _gather(error) if e), None)
    if first is not None:
        raise CheckpointError(first)


def load_checkpoint(runner: Runner, path: Path, load_optimizer: bool = True) -> dict[str, Any]:
    """Collective: restore the runner's state and this rank's RNG; return the trainer state."""
    verify_checkpoint(path)
    trainer_state = read_json(path / "trainer_state.json")
    if not isinstance(trainer_state.get("step"), int) or not isinstance(trainer_state.get("tokens_seen"), int):
        raise CheckpointError(
            f"{path / 'trainer_state.json'} lacks step or tokens_seen; resume from an older "
            f"checkpoint (train.resume={path.parent}/step_...)"
        )
    runner.load(path, load_optimizer=load_optimizer)
    rng_file = path / f"rng_rank{rank()}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved: keep the seeded state
        try:
            _set_rng_state(read_json(rng_file))
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise CheckpointError(
                f"{rng_file} does not hold a torch RNG state; resume from an older checkpoint "
                f"(train.resume={path.parent}/step_...)"
            ) from None
    return trainer_state


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file, or a CheckpointError naming the file."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing: the checkpoint is incomplete; resume from an older one "
            f"(train.resume={path.parent.parent}/step_...)"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); resume from an older checkpoint "
            f"(train.resume={path.parent.parent}/step_...)"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} is not a JSON object; resume from an older checkpoint (train.resume={path.parent.parent}/step_...)"
        )
    return obj


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


# ---------------------------------------------------------------------------------------------
# A resume with a config that differs from the checkpoint's: each differing key is applied or refused.

# Keys whose change a resume cannot honour, by prefix, with the reason (the first matching prefix wins;
# an exact key before its section). Everything else is applied from the first resumed step: the
# optimizer's hyperparameters and LR schedule (the schedule is a function of the step, evaluated with
# the new keys at the resumed step), max_steps, grad_clip, intervals, batch sizes, layout and precision
# (the checkpoint is layout-free), logging.
_FIXED: tuple[tuple[str, str], ...] = (
    ("model.name", ""),
    ("model.dropout", ""),
    ("model.init_from", ""),
    ("model.init_std", ""),
    ("model.", "the checkpoint holds this architecture's parameters"),
    ("data.cache_dir", ""),
    ("data.stream_workers", ""),
    ("data.", "the saved data position belongs to this dataset and tokenizer"),
    ("train.seed", "the seed fixed the data order the saved position refers to"),
    ("train.seq_len", "the saved data position counts sequences of this length"),
    ("distill.teacher", "the student was distilled from that teacher"),
    ("distill.hidden_weight", "it decides which projection parameters the checkpoint holds"),
    ("distill.attention_weight", "it decides which projection parameters the checkpoint holds"),
    ("distill.relation_heads", "it decides which projection parameters the checkpoint holds"),
    ("train.objective", "the saved weights and optimizer state were trained for that loss"),
    ("dpo.reference", "the policy was tuned against that reference model"),
    ("quant.start_step", ""),
    ("quant.", "the weights were trained against this quantisation grid"),
)


def resume_changes(cfg: Config, path: Path) -> list[str]:
    """Compare this run's config with the checkpoint's config.yaml (checked against checksums.json).

    Returns the applied changes as 'key old -> new'; raises CheckpointError listing every key that cannot
    change and why, before anything is built or written (out_dir/config.yaml keeps the run's config)."""
    import yaml

    from llmtrain.config import to_dict

    file = path / "config.yaml"
    fix = f"resume from another checkpoint (train.resume={path.parent}/step_...) or restore {file}"
    verify_files(path, ["config.yaml"], fix)
    try:
        saved = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid YAML ({str(exc).splitlines()[0]}); {fix}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise CheckpointError(f"{file} has no model section; {fix}")
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    # A key the checkpoint's llmtrain did not have yet counts as its default; one this version dropped is moot.
    defaults = _flatten(to_dict(Config()))
    old.update({k: defaults.get(k) for k in new.keys() - old.keys()})
    differing = sorted(k for k in new if old.get(k) != new[k] and k != "out_dir")
    refused = [(k, r) for k in differing if (r := _reason(k))]
    if refused:
        reasons: dict[str, list[str]] = {}
        for k, r in refused:
            reasons.setdefault(r, []).append(f"{k}={new.get(k)!r} (saved {old.get(k)!r})")
        raise CheckpointError(
            f"cannot resume {path} with changed keys: "
            + "; ".join(f"{', '.join(keys)}: {r}" for r, keys in reasons.items())
            + ". Use the saved values (see its config.yaml), or a new out_dir with model.init_from="
            + str(path)
        )
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in differing if k not in ("train.resume",)]


def _reason(key: str) -> str:
    for prefix, reason in _FIXED:
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return reason
    return ""


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
