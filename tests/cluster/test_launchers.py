"""Multi-node launches without SLURM: the DeepSpeed runner from a hostfile, and `accelerate launch`.

The `--no_ssh` test starts the per-node command of hostfile.example twice on this machine, as node 0 and
node 1 of a 2-node job with one rank each, the way users start it on two hosts without SSH.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from helpers import BIN, ROOT, TINY, TRAIN, env, free_port, losses

RECIPE = str(ROOT / "recipes" / "gpt_debug.yaml")
STEPS = 4
GOLDEN = {
    int(k): v
    for k, v in json.loads((ROOT / "tests" / "golden" / "gpt_tiny_zero_losses.json").read_text())["losses"].items()
    if int(k) <= STEPS
}


def _hostfile_from_example(path) -> list[str]:
    """hostfile.example's hosts with one slot each (one CPU rank per "node")."""
    hosts = [
        line.split()[0]
        for line in (ROOT / "hostfile.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    path.write_text("".join(f"{h} slots=1\n" for h in hosts))
    return hosts


def _run_nodes(cmds: list[list[str]], timeout: float = 240) -> list[str]:
    """Start the per-node commands of a multi-node job together (as each host would), wait for all, kill
    what is left on failure; every node must exit 0. Returns their logs, node by node."""
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cmd in cmds
    ]
    logs = []
    try:
        for proc in nodes:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for node, (proc, log) in enumerate(zip(nodes, logs)):
        assert proc.returncode == 0, f"node {node} exited {proc.returncode}\n{log[-4000:]}"
    return logs


def _assert_golden(out_dir) -> None:
    # dp 2 x micro 4 against the 1-rank micro 4 x 2 accumulation of the golden file: the same 8 sequences
    # per step, summed in another order (tests/test_train.py::test_zero_parity_two_ranks: within 1e-5).
    got = losses(out_dir)
    assert sorted(got) == sorted(GOLDEN), got
    for step, loss in GOLDEN.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), step


@pytest.mark.slow
def test_deepspeed_no_ssh_per_node_form_runs_a_two_node_job(tmp_path):
    hostfile, out = tmp_path / "hostfile", tmp_path / "run"
    hosts = _hostfile_from_example(hostfile)
    assert len(hosts) == 2, hosts
    port = free_port()
    logs = _run_nodes(
        [  # what each host runs, with its own --node_rank
            [
                str(BIN / "deepspeed"),
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(node_rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                TRAIN,
                RECIPE,
                *TINY,
                f"train.max_steps={STEPS}",
                f"out_dir={out}",
            ]
            for node_rank in range(2)
        ]
    )
    for node_rank, log in enumerate(logs):
        assert f"nnodes=2, num_local_procs=1, node_rank={node_rank}" in log, log[-4000:]
        assert f"{{'{hosts[0]}': [0], '{hosts[1]}': [1]}}" in log, log[-4000:]  # rank r on node r
    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["world_size"] == 2 and preflight["backend"] == "gloo"
    assert "world 2 (dp 2" in logs[0]
    _assert_golden(out)


def test_ssh_launch_without_ssh_fails_fast_naming_ssh(tmp_path):
    """The SSH form on a machine with no ssh client stops at DeepSpeed's ssh check, it does not hang."""
    hostfile = tmp_path / "hostfile"
    _hostfile_from_example(hostfile)
    no_ssh_path = dict(env(), PATH=str(BIN))  # the venv's tools only: no /usr/bin/ssh
    cmd = [
        str(BIN / "deepspeed"),
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "127.0.0.1",
        TRAIN,
        RECIPE,
        *TINY,
        f"out_dir={tmp_path / 'run'}",
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=no_ssh_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert "No such file or directory: 'ssh'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.slow
def test_accelerate_launch_two_processes_with_its_deepspeed_options(tmp_path):
    """`accelerate launch` starts the ranks (torchrun underneath); llmtrain still builds DeepSpeed from the
    recipe, and accelerate's own ZeRO stage is accepted because it agrees with parallel.zero_stage."""
    out = tmp_path / "run"
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--use_deepspeed",
        "--zero_stage",
        "2",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        TRAIN,
        RECIPE,
        *TINY,
        f"train.max_steps={STEPS}",
        "parallel.zero_stage=2",
        f"out_dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2 (dp 2" in proc.stdout and "ZeRO-2" in proc.stdout, proc.stdout[-3000:]
    _assert_golden(out)


@pytest.mark.slow
def test_accelerate_two_machines_one_process_each(tmp_path):
    """accelerate's multi-machine flags: what each of two hosts runs (`--num_machines 2 --machine_rank r
    --main_process_ip`), here both on this machine; the ranks meet and the losses equal the golden ones."""
    out, port = tmp_path / "run", free_port()
    logs = _run_nodes(
        [
            [
                str(BIN / "accelerate"),
                "launch",
                "--multi_gpu",
                "--num_machines",
                "2",
                "--machine_rank",
                str(machine_rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "--num_processes",
                "2",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                TRAIN,
                RECIPE,
                *TINY,
                f"train.max_steps={STEPS}",
                f"out_dir={out}",
            ]
            for machine_rank in range(2)
        ]
    )
    assert "world 2 (dp 2" in logs[0] and "checkpoint saved" in logs[0]
    _assert_golden(out)


def _accelerate_env(*launch_args: str) -> dict[str, str]:
    """The ACCELERATE_* variables `accelerate launch LAUNCH_ARGS script.py` gives its ranks, built by
    accelerate's own launcher code in this process (a subprocess would cost ~10 s of imports)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_simple_launcher_cmd_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*launch_args, "script.py"]))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""  # set by `accelerate launch` itself
        _, launch_env = prepare_deepspeed_cmd_env(args)
    else:
        _, launch_env = prepare_simple_launcher_cmd_env(args)
    return {k: v for k, v in launch_env.items() if k.startswith("ACCELERATE_")}


def test_accelerate_options_the_recipe_does_not_follow_are_refused(monkeypatch):
    from llmtrain.config import ConfigError, derive, load_config
    from llmtrain.parallel.launch_env import check_launcher_settings

    cfg = load_config(RECIPE, TINY)  # fp32, ZeRO-0, no offload, accumulation 2 on one rank
    derived = derive(cfg, 1)
    cases = [
        (["--mixed_precision", "bf16"], "ACCELERATE_MIXED_PRECISION=bf16 (use precision)"),
        (["--use_deepspeed", "--zero_stage", "2"], "ACCELERATE_DEEPSPEED_ZERO_STAGE=2 (use parallel.zero_stage)"),
        (
            ["--use_deepspeed", "--zero_stage", "0", "--offload_optimizer_device", "cpu"],
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE=cpu (use parallel.offload_optimizer)",
        ),
        (
            ["--use_deepspeed", "--zero_stage", "0", "--gradient_accumulation_steps", "4"],
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4 (use train.global_batch_size",
        ),
    ]
    for launch_args, message in cases:
        with monkeypatch.context() as m:
            for k, v in _accelerate_env("--num_processes", "1", *launch_args).items():
                m.setenv(k, v)
            with pytest.raises(ConfigError, match=re.escape(message)):
                check_launcher_settings(cfg, derived)
    # Values that agree with the recipe, and accelerate's defaults, pass.
    agreeing = [
        "--use_deepspeed",
        "--zero_stage",
        "0",
        "--gradient_accumulation_steps",
        "2",
        "--mixed_precision",
        "no",
        "--offload_optimizer_device",
        "none",
    ]
    with monkeypatch.context() as m:
        for k, v in _accelerate_env("--num_processes", "1", *agreeing).items():
            m.setenv(k, v)
        check_launcher_settings(cfg, derived)
