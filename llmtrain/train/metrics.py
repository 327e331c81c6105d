"""One metrics sink: console line + `<out_dir>/metrics.jsonl` + optional Weights & Biases, rank 0 only.

Every record is one JSON object per line. Training records hold at least step, loss, lr, grad_norm,
tokens_seen, tokens_per_s; eval records hold step, eval_loss, eval_ppl (no eval_ppl when the objective's loss
is not a token cross-entropy, e.g. DPO's). A resumed run appends, one record per step: when it starts from
step s, the records a killed run logged past s (steps it will now compute again) move to
`metrics.superseded.jsonl` first. A line torn by a crash mid-write is dropped
(and reported) when the next run opens the file; `read_metrics` skips a torn last line and names the
file and line of any other unreadable one.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from llmtrain.config import LogConfig
from llmtrain.errors import UserError
from llmtrain.utils import rank


class MetricsSink:
    def __init__(self, out_dir: str | Path, cfg: LogConfig, run_config: dict[str, Any], resume_step: int = 0):
        self.enabled = rank() == 0
        self.path = Path(out_dir) / "metrics.jsonl"
        self._wandb = None
        if self.enabled and self.path.exists():
            _repair(self.path, resume_step)
        if self.enabled and cfg.wandb:
            self._wandb = _start_wandb(Path(out_dir), cfg.wandb_project, run_config)

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        record = {k: _finite_or_none(v) for k, v in record.items()}  # strict JSON: NaN/inf become null
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])
        if console:
            from tqdm import tqdm

            tqdm.write(console)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _start_wandb(out_dir: Path, project: str, run_config: dict[str, Any]) -> Any:
    import wandb

    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"  # no key, no network: keep the run locally, sync later
    id_file = out_dir / "wandb_id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    return wandb.init(
        project=project,
        dir=str(out_dir),
        id=id_file.read_text().strip(),
        resume="allow",
        config=run_config,
        name=out_dir.name,
    )


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl, in file order. A torn last line (a crash mid-write) is skipped;
    an unreadable line elsewhere is a UserError naming the file and the line."""
    lines = Path(path).read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break  # torn by a crash while it was written
            raise UserError(f"{path}:{i + 1}: not a JSON record ({line[:60]!r}); delete or repair that line") from None
    return records


def _repair(path: Path, resume_step: int) -> None:
    """Drop a torn last line, and move records past the step this run starts from (they are computed
    again) to metrics.superseded.jsonl, so the file holds one record per step. Atomic rewrite."""
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    torn = bool(lines) and not text.endswith("\n")
    if torn:
        from llmtrain.utils import eprint

        eprint(f"{path}: dropped a torn last line (a crash while it was written): {lines.pop()[:60]!r}")
    keep: list[str] = []
    later: list[str] = []
    for line in lines:
        try:
            step = json.loads(line).get("step", 0) if line.strip() else None
        except ValueError:
            step = None  # an unreadable line is kept as it is, for read_metrics to name
        (later if step is not None and step > resume_step else keep).append(line)
    if later:
        with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
            f.write("".join(line + "\n" for line in later))
    if torn or later:
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def last_by_step(records: list[dict[str, Any]], key: str) -> dict[int, float]:
    """step -> value of `key`, the later record winning (see module docstring)."""
    return {r["step"]: r[key] for r in records if key in r}


def format_line(rec: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {rec['step']:>6}/{max_steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}"]
    if rec.get("tflops_per_device") is not None:
        parts.append(f"{rec['tflops_per_device']:.3g} TFLOP/s/dev")
    if rec.get("grad_norm") is not None:
        parts.append(f"gnorm {rec['grad_norm']:.3f}")
    parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)


def plot_losses(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Plot training loss (and eval loss) against step; returns the PNG path, or None without data."""
    records = read_metrics(metrics_path)
    train = sorted(last_by_step(records, "loss").items())
    evals = sorted(last_by_step(records, "eval_loss").items())
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
