"""Run the real launchers in subprocesses, the way users do, and read back what they wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from llmtrain.train.metrics import last_by_step, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launchers" / "train.py")
BIN = Path(sys.executable).parent

# A tiny GPT on the bundled text: seconds per run on 2 CPU cores.
TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.eval_interval=0",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "checkpoint.interval=0",
    "log.interval=1",
    "optim.warmup_steps=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(threads: int = 1) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        e.pop(k, None)
    return e


def launch_cmd(launcher: str, nproc: int) -> list[str]:
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, TRAIN]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", TRAIN]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={free_port()}", TRAIN]
    raise ValueError(launcher)


def train(
    out_dir: Path,
    *overrides: str,
    launcher: str = "python",
    nproc: int = 1,
    recipe: str = "recipes/gpt_debug.yaml",
    check: bool = True,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    cmd = [*launch_cmd(launcher, nproc), str(ROOT / recipe), *TINY, f"out_dir={out_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(out_dir: Path) -> dict[int, float]:
    return last_by_step(read_metrics(Path(out_dir) / "metrics.jsonl"), "loss")


def grad_norms(out_dir: Path) -> dict[int, float]:
    return last_by_step(read_metrics(Path(out_dir) / "metrics.jsonl"), "grad_norm")


GOLDEN = ROOT / "tests" / "golden" / "gpt_tiny_zero_losses.json"


def golden_losses() -> dict[int, float]:
    """The pinned 1-rank ZeRO-0 fp32 per-step losses of TINY over 6 steps (tests/golden/make_golden.py)."""
    return {int(k): v for k, v in json.loads(GOLDEN.read_text())["losses"].items()}


def golden_grad_norms() -> dict[int, float]:
    """The 1-rank gradient norms (before clipping) of the golden run, step by step."""
    return {int(k): v for k, v in json.loads(GOLDEN.read_text())["grad_norms"].items()}


def assert_norms_match(got: dict[int, float], ref: dict[int, float], rel_tol: float = 2e-6) -> None:
    """Every layout reports the global gradient norm of the same gradients, summed in another order (~1e-7
    relative in fp32). A weight matrix or the tied embedding missed or counted twice moves TINY's norm by
    >= 1e-3; a norm computed by torch's CPU float32 vector_norm was 3e-5 off (why 2e-6 and not looser)."""
    assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
    for step in ref:
        assert abs(got[step] - ref[step]) <= rel_tol * ref[step], (step, got[step], ref[step])


def assert_losses_match(got: dict[int, float], ref: dict[int, float], abs_tol: float) -> None:
    assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
    for step in ref:
        assert abs(got[step] - ref[step]) <= abs_tol, (step, got[step], ref[step])
