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
        _run(
            "benchmarks/throughput.py",
            "recipes/gpt_debug.yaml",
            *TINY,
            "--steps",
            "3",
            "--warmup",
            "1",
            "--out",
            str(out),
        )
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


def test_gpu_sweep_plan_validates_every_case_of_the_real_matrix():
    proc = _run("benchmarks/gpu_sweep.py", "--dry-run")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 15 and lines[0].startswith("1b-base: python benchmarks/throughput.py recipes/gpt_1b.yaml")
    assert all("precision=bf16" in ln and "train.seq_len=2048" in ln for ln in lines)
    bad = subprocess.run(
        [sys.executable, "benchmarks/gpu_sweep.py", "--dry-run", "--set", "train.compiled=true"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "train.compiled" in bad.stderr  # a typo fails before any case runs


def test_gpu_sweep_records_each_case_and_carries_on_where_it_stopped(tmp_path):
    out = tmp_path / "sweep.json"
    tiny = [
        a
        for kv in TINY
        if not kv.startswith(("train.eval", "checkpoint", "log.", "train.sample"))
        for a in ("--set", kv)
    ]
    args = [
        "benchmarks/gpu_sweep.py",
        "--recipe",
        "recipes/gpt_debug.yaml",
        *tiny,
        "--set",
        "precision=fp32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--out",
        str(out),
    ]
    _run(*args, "--only", "1b-base,1b-zero3")
    recs = json.loads(out.read_text())
    assert [r["case"] for r in recs] == ["1b-base", "1b-zero3"]
    assert recs[1]["zero_stage"] == 3 and recs[0]["zero_stage"] != 3 and recs[0]["tokens_per_s"] > 0
    # a missing corpus fails at run time: recorded as that case's error, the sweep goes on
    _run(*args, "--only", "1b-*", "--set", "data.path=/nonexistent/corpus", "--budget-min", "0.6")
    recs = json.loads(out.read_text())
    assert [r["case"] for r in recs[:2]] == ["1b-base", "1b-zero3"]  # measured cases kept, not re-run
    failed = recs[2]
    assert (
        failed["case"] == "1b-compile" and failed["error"].startswith("exit") and "/nonexistent" in failed["log_tail"]
    )
    table = _run("benchmarks/gpu_sweep.py", "--table", str(out)).stdout
    assert "| 1b-zero3 |" in table and "| 1b-compile | failed: exit" in table


def test_data_bench_memory_part_measures_the_workers_themselves(tmp_path):
    """A spawned worker's peak is its own (~65 MB: tokenizers + the stdlib), not the main process's size at
    the fork before its exec (~430 MB), which ru_maxrss of the children would report."""
    out = tmp_path / "data.json"
    _run("benchmarks/data_bench.py", "--parts", "memory", "--scales", "1", "--out", str(out))
    mem = json.loads(out.read_text())["memory"]["1x"]
    assert set(json.loads(out.read_text())) == {"machine", "corpus", "memory"}  # only the part asked for
    assert 10 < mem["peak_rss_worker_mb"] < mem["peak_rss_main_mb"] / 2, mem


def test_model_speed_benchmark_runs_llmtrain_and_the_reference_on_the_same_shape(tmp_path):
    out = tmp_path / "speed.json"
    _run("benchmarks/model_speed.py", "--cases", "debug-1p", "--rounds", "2", "--steps", "1", "--no-warmup",
         "--set", "model.n_layer=1", "--out", str(out))  # fmt: skip
    (case,) = json.loads(out.read_text())["cases"]
    assert case["case"] == "debug-1p" and case["shape"]["n_layer"] == 1 and len(case["ratios"]) == 2
    assert case["llmtrain_tokens_per_s"] > 0 and case["reference_tokens_per_s"] > 0
    assert case["llmtrain_gelu"] == case["reference_gelu"] == "none"  # the same computation by default
    # the reference is the same shape as llmtrain's model: tied embeddings, GPT-2 blocks
    assert abs(case["reference_params"] - 8192 * 192 - 128 * 192 - 12 * 192 * 192) < 20 * 192


def test_adamw_cpu_benchmark_times_and_compares_the_three_forms(tmp_path):
    """The figures behind keeping torch's default AdamW on CPU: foreach gives the loop's bits, fused does not
    (it rounds differently), each timed."""
    out = tmp_path / "adamw.json"
    _run("benchmarks/adamw_cpu.py", "--set", "model.n_layer=1", "--steps", "3", "--rounds", "2", "--out", str(out))
    doc = json.loads(out.read_text())
    assert set(doc["ms_per_step"]) == {"loop", "foreach", "fused"} and doc["steps_compared"] == 6
    assert doc["same_bits_as_loop"] == {"foreach": True, "fused": False}
    assert all(ms > 0 for ms in doc["ms_per_step"].values())


def test_finetune_benchmark_table_of_its_committed_results(tmp_path):
    """benchmarks/finetune.py needs SmolLM2 and minutes of CPU per configuration: its committed results are
    checked here (every configuration ran or says why not; aims computed), and --merge / --table read them."""
    results = ROOT / "benchmarks" / "results" / "finetune.json"
    proc = _run("benchmarks/finetune.py", "--merge", str(results), "--out", str(tmp_path / "f.json"))
    doc = json.loads((tmp_path / "f.json").read_text())
    names = [r["name"] for r in doc["rows"]]
    assert names == ["full", "lora8", "lora16", "qlora16", "full_all_tokens", "lora16_all_tokens"]
    assert all(r["status"] == "ok" or r["status"].startswith("not run") for r in doc["rows"])
    assert proc.stdout.count("\n| ") == len(names) + 1  # header rule + one line per configuration
    full = doc["rows"][0]
    assert full["grad_bytes"] + full["optimizer_bytes"] == 12 * full["trainable_params"]  # fp32 grad + 2 moments
    assert set(doc["aims"]) >= {"lora8", "lora16", "mask_full", "mask_lora16"}


def test_bert_compression_benchmark_table_of_its_committed_results():
    """benchmarks/compression_real_bert.py needs all-MiniLM-L6-v2 and an hour of CPU: its committed results are
    checked here (gap closed is the accuracies' ratio; the aim's flag agrees with them) and --table reads them."""
    results = ROOT / "benchmarks" / "results" / "compression_real_bert.json"
    doc = json.loads(results.read_text())
    acc = {k: v["acc"] for k, v in doc["accuracy"].items()}
    for v, gap in doc["gap_closed_acc"].items():
        assert abs(gap - (acc[v] - acc["scratch_ce"]) / (acc["teacher"] - acc["scratch_ce"])) < 1e-9
    a = acc["pruned_distilled"]
    met = doc["gap_closed_acc"]["pruned_distilled"] >= 0.8 and a > acc["pruned_ce"] and a > acc["scratch_ce"]
    assert doc["aim_a_closes_0.8_and_beats_b_c"] == met
    proc = _run("benchmarks/compression_real_bert.py", "--table", str(results))
    assert proc.stdout.count("\n| ") == 6  # header rule + teacher + four students
