"""A real two-node SLURM cluster on this host (tests/cluster/slurm_up.sh) for the tests in this folder.

The cluster needs root (daemons, network namespaces) and installs Debian's slurm-wlm + munge when they
are missing. When it cannot be brought up the tests here fail with the script's output: a missing
cluster is a failure. One case skips, saying why: a non-root user on a machine without SLURM, who can
neither install it nor start its daemons (a non-root user WITH SLURM installed still fails: the daemons
need root, and that is worth seeing).
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers.py, shared with the other end-to-end tests

STATE_DIR = Path(os.environ.get("LLMTRAIN_SLURM_DIR", "/var/tmp/llmtrain-slurm"))
UP_TIMEOUT_S = 600  # a fresh machine runs apt-get (~15 s on a warm mirror, minutes on a cold one)
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


@dataclass
class Job:
    job_id: str
    fields: dict[str, str]  # `scontrol show job -o` key=value pairs at the end

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "?")


@dataclass
class SlurmCluster:
    conf: Path

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return dict(base, SLURM_CONF=str(self.conf))

    def run(self, *cmd: str, timeout: float = 30) -> str:
        proc = subprocess.run(cmd, env=self.env(dict(os.environ)), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> Job:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return Job(job_id, dict(f.split("=", 1) for f in out.split() if "=" in f))

    def wait(self, job_id: str, timeout: float) -> Job:
        """Poll until the job ends; past `timeout` cancel it and fail, naming its last state."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in TERMINAL:
                return job
            if time.monotonic() > deadline:
                self.run("scancel", job_id)
                raise AssertionError(f"job {job_id} still {job.state} after {timeout:.0f} s; cancelled")
            time.sleep(1)


def _cluster_running() -> bool:
    pid_file = STATE_DIR / "run" / "slurmctld.pid"
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def slurm_cluster():
    """Bring the cluster up (idempotent); tear it down afterwards unless it was already running."""
    if os.geteuid() != 0 and not any(
        shutil.which(b, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") for b in ("slurmctld", "slurmd", "sbatch")
    ):
        pytest.skip(
            f"no SLURM on this machine (no slurmctld/slurmd/sbatch on PATH) and user {getpass.getuser()} "
            f"is not root, so tests/cluster/slurm_up.sh can neither install nor start it; run the "
            f"suite as root to bring up the 2-node test cluster"
        )
    if os.geteuid() != 0:
        pytest.fail(
            "the SLURM cluster tests need root (they start slurmctld/slurmd in network "
            "namespaces); run the suite as root, as CI does"
        )
    was_running = _cluster_running()
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(HERE / "slurm_up.sh")], capture_output=True, text=True, timeout=UP_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(
            f"tests/cluster/slurm_up.sh exited {proc.returncode} after {time.monotonic() - t0:.0f} s:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    yield SlurmCluster(STATE_DIR / "slurm.conf")
    if not was_running:
        subprocess.run(["bash", str(HERE / "slurm_down.sh")], capture_output=True, text=True, timeout=120)
