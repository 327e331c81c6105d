"""Running lm-evaluation-harness tasks on an llmtrain decoder: `llmtrain eval MODEL --tasks` and
`train.eval_tasks`. TASKS are lm-eval task (or group) names, the offline tasks shipped in `tasks/`
(always available), or paths to task YAML files or folders of them."""

from __future__ import annotations

import difflib
import functools
import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmtrain.errors import UserError

TASKS_DIR = Path(__file__).parent / "tasks"
INSTALL_HINT = "pip install -e .[eval]"


def require_lm_eval() -> None:
    """UserError (one line, exit 2) saying how to install lm-evaluation-harness when it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"task evaluation needs lm-evaluation-harness, which is not installed ({exc.msg}); "
            f"install it with `{INSTALL_HINT}`"
        ) from None


def split_tasks(spec: str | list[str]) -> tuple[list[str], list[str]]:
    """(task names, include paths) of a comma-separated TASKS string or list: existing files/folders are
    task YAML paths (a YAML file names its task)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    names, paths = [], []
    for item in items:
        p = Path(item).expanduser()
        if p.suffix in (".yaml", ".yml") and not p.is_file():
            raise UserError(f"{item}: no such task YAML file")
        if p.suffix in (".yaml", ".yml"):
            paths.append(str(p.parent.resolve()))
            names.append(yaml_task(p) or p.stem)
        elif p.is_dir():
            paths.append(str(p.resolve()))
            names.extend(t for t in map(yaml_task, sorted(p.glob("*.yaml"))) if t)
        else:
            names.append(item)
    return names, paths


def yaml_task(path: Path) -> str | None:
    """The `task:` name a task YAML defines (None for a file that only holds shared settings)."""
    import yaml

    class Lenient(yaml.SafeLoader):  # lm-eval YAMLs use `!function module.name` tags: ignore them here
        pass

    Lenient.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        doc = yaml.load(path.read_text(), Loader=Lenient)
    except yaml.YAMLError:
        return None
    task = doc.get("task") if isinstance(doc, dict) else None
    return task if isinstance(task, str) else None


def task_manager(spec: str | list[str]) -> tuple[Any, list[str]]:
    """(lm-eval TaskManager that knows the offline tasks and the given paths, task names), or UserError
    naming every unknown task, the nearest known names and where the list is."""
    require_lm_eval()
    names, paths = split_tasks(spec)
    if not names:
        raise UserError("--tasks is empty: give lm-eval task names (comma-separated) or a path to task YAMLs")
    tm = _manager(tuple(paths), defaults=False)  # indexing lm-eval's own ~15k task YAMLs takes seconds
    if not all(n in tm.all_tasks for n in names):
        tm = _manager(tuple(paths), defaults=True)
    known = set(tm.all_tasks)
    unknown = [n for n in names if n not in known and not tm.match_tasks([n])]
    if unknown:
        near = sorted({m for n in unknown for m in difflib.get_close_matches(n, known, n=3)})
        raise UserError(
            f"unknown task(s) {', '.join(unknown)}"
            + (f" (did you mean {', '.join(near)}?)" if near else "")
            + "; `lm-eval ls tasks` lists lm-eval's tasks, the offline ones are "
            + ", ".join(sorted(t for t in (yaml_task(y) for y in TASKS_DIR.glob("*.yaml")) if t))
        )
    return tm, names


@functools.lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], defaults: bool) -> Any:
    """One TaskManager per set of paths for the process (a run scores its tasks at every evaluation)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *paths], include_defaults=defaults)


@contextmanager
def _rng_kept() -> Iterator[None]:
    """Leave Python's, numpy's and torch's global random state as it was (training continues after)."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):  # lm-eval seeds torch (all devices) for few-shot sampling
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def evaluate_tasks(
    lm: Any, spec: str | list[str], limit: int | None = None, num_fewshot: int | None = None, bootstrap_iters: int = 0
) -> dict[str, Any] | None:
    """lm-eval's results dict (`results`, `versions`, `n-shot`, `config`, ...) of `lm` on the tasks; None on
    ranks other than 0 when `lm` shards documents over ranks."""
    from lm_eval import evaluator

    tm, names = task_manager(spec)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notices about custom loaders, git, ...
    with _rng_kept():
        return evaluator.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=tm,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            random_seed=0,
            numpy_random_seed=1234,
            torch_random_seed=1234,
            fewshot_random_seed=1234,
        )


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{'<task>_<metric>': value} of every numeric metric (stderr left out), e.g. llmtrain_cloze_acc."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():  # "acc,none": metric,filter ("alias", "sample_len" are not metrics)
            metric = key.split(",")[0]
            if (
                "," in key
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and "stderr" not in metric
            ):
                flat[f"{task}_{metric}"] = float(value)
    return flat


def write_results(results: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return out


def run_tasks(
    checkpoint: str | Path,
    tasks: str | list[str],
    device: str = "",
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 1000,
) -> dict[str, Any] | None:
    """lm-eval results of the decoder at `checkpoint` on `tasks`. Under torchrun (WORLD_SIZE > 1) each rank
    loads the model and scores its share of the documents; rank 0 returns the results, the others None."""
    task_manager(tasks)  # unknown names fail before the model loads
    from llmtrain.evaluation.harness import LlmtrainLM

    with _ranks(device) as dev:
        lm = LlmtrainLM.from_checkpoint(checkpoint, dev, batch_size)
        return evaluate_tasks(lm, tasks, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters)


@contextmanager
def _ranks(device: str) -> Iterator[str]:
    """This rank's device, with a process group for the duration when launched with WORLD_SIZE > 1."""
    import os

    import torch
    import torch.distributed as dist

    from llmtrain.inference import default_device

    device = default_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    on_gpu = device.startswith("cuda")
    if on_gpu and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    try:
        yield device
        dist.barrier()  # every rank past its last collective before any tears the group down (gloo can abort)
    finally:
        dist.destroy_process_group()
