"""One metrics sink: console line + `<out_dir>/metrics.jsonl` + optional Weights & Biases, rank 0 only.

Every record is one JSON object per line. Training records hold at least step, loss, lr, grad_norm,
tokens_seen, tokens_per_s; eval records hold step, eval_loss, eval_ppl. A resumed run appends; when a
step appears twice (a run killed after logging it and resumed from an older checkpoint) the last record
for that step is the one the resumed run produced.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from llmtrain.config import LogConfig
from llmtrain.utils import rank


class MetricsSink:
    def __init__(self, out_dir: str | Path, cfg: LogConfig, run_config: dict[str, Any]):
        self.enabled = rank() == 0
        self.path = Path(out_dir) / "metrics.jsonl"
        self._wandb = None
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
    return wandb.init(project=project, dir=str(out_dir), id=id_file.read_text().strip(), resume="allow",
                      config=run_config, name=out_dir.name)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl, in file order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
