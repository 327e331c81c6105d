"""The throughput benchmarks run as users run them and write what their docstrings promise (tiny model, few
steps: this checks the commands and their JSON, not the speed, which a timed test could not judge)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT, TINY, env


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_throughput_benchmark_appends_a_record(tmp_path):
    out = tmp_path / "thr.json"
    for _ in range(2):  # a second invocation appends to the list
        _run("benchmarks/throughput.py", "recipes/gpt_debug.yaml", *TINY, "--steps", "3", "--warmup", "1",
             "--out", str(out))
    runs = json.loads(out.read_text())
    assert len(runs) == 2
    rec = runs[0]
    assert rec["tokens_per_s"] > 0 and rec["tflops_per_device"] > 0
    assert rec["mfu"] is None and rec["device"] == "cpu"  # no peak for a CPU: null, never invented
    assert rec["world_size"] == 1 and rec["steps"] == 3 and rec["warmup_excluded"] == 1
    assert "model.n_layer=2" in rec["overrides"]


def test_trainer_overhead_benchmark_compares_both_loops(tmp_path):
    out = tmp_path / "overhead.json"
    _run("benchmarks/trainer_overhead.py", "--rounds", "2", "--steps", "2", "--out", str(out), *TINY)
    rec = json.loads(out.read_text())
    assert rec["threads"] == 1
    assert len(rec["llmtrain_step_s"]) == len(rec["plain_step_s"]) == 2
    assert rec["ratio"] == rec["plain_step_s_median"] / rec["llmtrain_step_s_median"] > 0
