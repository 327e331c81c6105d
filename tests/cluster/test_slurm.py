"""A 2-node x 1-rank `sbatch` job of gpt_debug on a real SLURM cluster (two slurmd on this host).

The job goes through exactly what users submit: launchers/slurm/train.sbatch -> one srun task per node
(launchers/slurm/node.sh) -> torchrun -> launchers/train.py. Each node is a network namespace with its
own address and hostname, so the rendezvous and the gloo all-reduces really cross "hosts". Like compute
nodes on many clusters the namespaces have no route to the internet: the bundled corpus is staged into
the shared cache from this (login) host first.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
from helpers import ROOT, TINY, env

from llmtrain.config import load_config
from llmtrain.data import resolve_sources
from llmtrain.train.metrics import last_by_step, read_metrics

MAX_STEPS = 4
RECIPE = "recipes/gpt_debug.yaml"
JOB_TIMEOUT_S = 300  # ~40 s on 2 busy cores: most of it is two interpreters importing torch + deepspeed

pytestmark = pytest.mark.slow


def _logs(tmp_path, run_dir) -> str:
    """Everything the job wrote, for failure messages."""
    parts = []
    for path in sorted([*tmp_path.glob("slurm-*.out"), *(run_dir / "logs").glob("*.log")]):
        parts.append(f"----- {path.name}\n{path.read_text()[-3000:]}")
    return "\n".join(parts)


def _submit(slurm_cluster, tmp_path, script: str, *args: str) -> str:
    """sbatch a 2-node job of one of our scripts as a user does; its job id."""
    cmd = ["sbatch", "--parsable", "--nodes=2", f"--output={tmp_path}/slurm-%j.out", script, *args]
    job_env = slurm_cluster.env(dict(env(threads=1), LLMTRAIN_PYTHON=sys.executable))
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def _wait_completed(slurm_cluster, job_id: str, tmp_path, run_dir):
    job = slurm_cluster.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert (job.state, job.fields.get("ExitCode")) == ("COMPLETED", "0:0"), (
        f"job {job_id} ended {job.state} exit {job.fields.get('ExitCode')}\n{_logs(tmp_path, run_dir)}"
    )
    return job


def test_two_node_sbatch_job_trains_gpt_debug(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"train.max_steps={MAX_STEPS}"]
    resolve_sources(load_config(ROOT / RECIPE, overrides).data)  # stage the corpus (downloads on a cold cache)
    job_id = _submit(slurm_cluster, tmp_path, "launchers/slurm/train.sbatch", RECIPE, *overrides, f"out_dir={run_dir}")

    job = _wait_completed(slurm_cluster, job_id, tmp_path, run_dir)
    assert job.fields["NumNodes"] == "2" and job.fields["NodeList"] == "llmnode[1-2]"

    # One node task per node, each on its own host, both in the same 2-node rendezvous.
    logs = run_dir / "logs"
    for node_rank, host in enumerate(["llmnode1", "llmnode2"]):
        text = (logs / f"node{node_rank}.log").read_text()
        assert f"host={host} node_rank={node_rank} nnodes=2 procs_per_node=1 master=llmnode1:" in text, text
        assert "torchrun exited 0" in text, text
    assert sorted(p.name for p in logs.glob("rank*.log")) == ["rank0.log", "rank1.log"]
    preflight = json.loads((run_dir / "preflight.json").read_text())
    assert preflight["world_size"] == 2 and preflight["backend"] == "gloo"
    assert preflight["hosts"] == {"llmnode1": [0], "llmnode2": [1]}  # rank r on node r: two real "hosts"

    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1)), train
    assert all(math.isfinite(r["loss"]) for r in train), train
    assert (run_dir / "checkpoints" / "latest").read_text().strip().endswith(f"step_{MAX_STEPS:08d}")


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """SIGUSR1 to the batch shell, as `#SBATCH --signal=B:USR1@120` sends it before the time limit:
    the ranks checkpoint, run.sbatch requeues the job, and the same job id resumes in the same run
    directory up to max_steps. (The timed `--signal` itself was checked by hand with `--time=1
    --signal=B:USR1@55`: SLURM delivers it only on its ~30 s timer, too slow for the suite.)"""
    run_dir, max_steps = tmp_path / "run", 40  # >= 38 steps left after the signal: seconds of margin
    overrides = [*TINY, f"train.max_steps={max_steps}", "checkpoint.keep_last=2"]
    resolve_sources(load_config(ROOT / RECIPE, overrides).data)
    job_id = _submit(slurm_cluster, tmp_path, "launchers/slurm/train.sbatch", RECIPE, *overrides, f"out_dir={run_dir}")

    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.exists() and any(r.get("step", 0) >= 2 for r in read_metrics(metrics))):
        assert slurm_cluster.job(job_id).state in ("PENDING", "RUNNING"), _logs(tmp_path, run_dir)
        assert time.monotonic() < deadline, f"no step 2 after {JOB_TIMEOUT_S} s\n{_logs(tmp_path, run_dir)}"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    job = slurm_cluster.wait(job_id, timeout=2 * JOB_TIMEOUT_S)
    assert (job.state, job.fields.get("ExitCode"), job.fields.get("Restarts")) == ("COMPLETED", "0:0", "1"), (
        f"job {job_id} ended {job.state} exit {job.fields.get('ExitCode')} restarts {job.fields.get('Restarts')}"
        f"\n{_logs(tmp_path, run_dir)}"
    )
    stops = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(stops) == 2 and stops[-1] == f"step_{max_steps:08d}", stops
    stopped_at = int(stops[0].removeprefix("step_"))
    assert 2 <= stopped_at < max_steps
    assert (
        f"resumed from {run_dir / 'checkpoints' / stops[0]} at step {stopped_at}"
        in (run_dir / "logs" / "rank0.log").read_text()
    )
    train = last_by_step(read_metrics(metrics), "loss")
    assert sorted(train) == list(range(1, max_steps + 1)) and all(map(math.isfinite, train.values()))


def test_sigterm_to_the_job_steps_checkpoints_and_completes(slurm_cluster, tmp_path):
    """`scancel --signal=TERM JOB` (what a preemption or an admin sends the job steps): every rank writes
    the stop checkpoint and exits 0, each node's torchrun (through launchers/torchrun.py, which plain
    torchrun's exit 1 after a signal made fail) exits 0, so srun and the job end COMPLETED 0:0."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, "train.max_steps=100000"]
    resolve_sources(load_config(ROOT / RECIPE, overrides).data)
    job_id = _submit(slurm_cluster, tmp_path, "launchers/slurm/train.sbatch", RECIPE, *overrides, f"out_dir={run_dir}")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.exists() and any(r.get("step", 0) >= 2 for r in read_metrics(metrics))):
        assert slurm_cluster.job(job_id).state in ("PENDING", "RUNNING"), _logs(tmp_path, run_dir)
        assert time.monotonic() < deadline, f"no step 2 after {JOB_TIMEOUT_S} s\n{_logs(tmp_path, run_dir)}"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=TERM", job_id)
    job = _wait_completed(slurm_cluster, job_id, tmp_path, run_dir)
    assert job.fields.get("Restarts") == "0"
    for node_rank in range(2):
        assert "torchrun exited 0" in (run_dir / "logs" / f"node{node_rank}.log").read_text()
    assert "stop requested by signal" in (run_dir / "logs" / "rank0.log").read_text()
    assert (run_dir / "checkpoints" / "latest").is_file() and not (run_dir / "run.lock").exists()


def test_two_node_distill_sbatch_job(slurm_cluster, tmp_path):
    """launchers/slurm/distill.sbatch: the same node logic with launchers/distill.py as the entry. A tiny
    teacher is trained here first (one process), then a 2-node job distils a student from it."""
    teacher, run_dir = tmp_path / "teacher", tmp_path / "run"
    overrides = [*TINY, "train.max_steps=2"]
    resolve_sources(load_config(ROOT / RECIPE, overrides).data)
    made = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "train.py"), RECIPE, *overrides, f"out_dir={teacher}"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    job_id = _submit(
        slurm_cluster,
        tmp_path,
        "launchers/slurm/distill.sbatch",
        "recipes/distill_gpt_debug.yaml",
        *TINY,
        f"train.max_steps={MAX_STEPS}",
        f"distill.teacher={teacher}",
        f"out_dir={run_dir}",
    )

    job = _wait_completed(slurm_cluster, job_id, tmp_path, run_dir)
    assert job.fields["NumNodes"] == "2"
    for node_rank in range(2):
        text = (run_dir / "logs" / f"node{node_rank}.log").read_text()
        assert f"node_rank={node_rank} nnodes=2" in text and "torchrun exited 0" in text, text
    assert json.loads((run_dir / "preflight.json").read_text())["world_size"] == 2
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1)), train
    assert all(math.isfinite(r["loss"]) for r in train), train
    assert all("kd_loss" in r for r in train), train[0]  # the teacher term is there: it distilled
