"""Planner figures against hand computations from the ZeRO paper's formulas."""

import subprocess
import sys

import pytest
from helpers import ROOT

from llmtrain.config import load_config
from llmtrain.plan import GiB, activation_bytes_per_layer, make_plan, model_state_bytes

PSI_1B = 50304 * 2048 + 2048 * 2048 + 24 * (12 * 2048**2 + 13 * 2048) + 2 * 2048  # gpt_1b, tied


@pytest.mark.parametrize("stage,expected", [(0, 16.0), (1, 4 + 12 / 8), (2, 2 + 14 / 8), (3, 16 / 8)])
def test_zero_paper_formulas(stage, expected):
    s = model_state_bytes(1.0, 8, stage, mixed=True)
    assert s.total == pytest.approx(expected)


def test_gpt_1b_on_one_node_by_hand():
    cfg = load_config(ROOT / "recipes" / "gpt_1b.yaml")  # bf16, ZeRO-1, micro 8, seq 2048
    pl = make_plan(cfg, "gpt_1b", nodes=1, gpus_per_node=8, gpu_memory_gb=80, mfu=0.5, flash=False)
    assert pl.params_total == PSI_1B == 1_315_819_520
    assert pl.model_states_gib["total"] == pytest.approx((4 + 12 / 8) * PSI_1B / GiB)  # 6.74 GiB
    s, b, h, a = 2048, 8, 2048, 16
    assert pl.activations_gib["none"] == pytest.approx(24 * s * b * h * (34 + 5 * a * s / h) / GiB)
    assert pl.activations_gib["full"] == pytest.approx(24 * 2 * s * b * h / GiB)
    assert not pl.fits  # 8 x 2048 tokens per GPU without recomputation needs ~94 GiB of activations
    tokens = 512 * 2048
    flops_per_token = 6 * (PSI_1B - 2048 * 2048) + 12 * 24 * 2048 * 2048
    assert pl.step_time_s == pytest.approx(flops_per_token * tokens / (8 * 989e12 * 0.5))
    full = make_plan(
        load_config(ROOT / "recipes" / "gpt_1b.yaml", ["parallel.activation_checkpointing=full"]), "gpt_1b", 1, 8, 80
    )
    assert full.fits and full.total_gib < 20
    flash = make_plan(cfg, "gpt_1b", 1, 8, 80)  # flash attention stores no s x s attention matrix
    assert flash.activations_gib["none"] == pytest.approx(24 * s * b * h * 34 / GiB)
    assert flash.fits


def test_tensor_parallel_divides_activations():
    assert activation_bytes_per_layer(1024, 4, 1024, 16, t=2) == pytest.approx(
        activation_bytes_per_layer(1024, 4, 1024, 16, t=1) / 2
    )


def test_plan_cli():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmtrain.cli",
            "plan",
            str(ROOT / "recipes/gpt_1b.yaml"),
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--gpu-memory-gb",
            "80",
            "parallel.activation_checkpointing=full",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "on 16 GPUs" in proc.stdout and "fits" in proc.stdout and "ZeRO-1" in proc.stdout
