"""Quantisation-aware training and distillation (llmtrain/compress/quant/qat.py): the fake-quantised linear
in process, then runs through the real launchers: quant.start_step, the loss falls, exact resume, tp2 against
one rank, QAD with cached teacher logits, and bad `quant:` input as one line with exit 2.

The launcher runs share one schedule (TINY, 6 steps, decay over 6) with int4 fake quantisation from step 4
(quant.start_step=3): steps 1-3 train in full precision and must be the plain run's, steps 4-6 quantised.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, TINY, TRAIN, assert_losses_match, env, golden_losses, losses, train

from llmtrain.compress.quant.grid import QuantSpec, round_to_nearest
from llmtrain.compress.quant.qat import FakeQuantLinear, fake_quant, qat_state, quant_targets
from llmtrain.config import load_config
from llmtrain.errors import ConfigError
from llmtrain.models import build_model
from llmtrain.models.converters import at_step

QAT = ["quant.bits=4", "quant.group_size=32", "quant.start_step=3", "optim.decay_steps=6"]
STEPS = 6
TOL = 1e-5  # as tests/parallel/test_tensor_parallel.py: fp32 sums in another order over 6 steps


def _tiny(*overrides: str):
    cfg = load_config(ROOT / "recipes" / "gpt_debug.yaml", [*TINY, *QAT, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights()
    return cfg, model


def test_fake_quantised_linear_is_exact_off_and_straight_through_on():
    cfg, plain = _tiny()
    model = copy.deepcopy(plain)
    fake_quant(cfg.quant)(model)
    targets = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")]
    assert quant_targets(plain) == targets  # the tied head stays float
    assert [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)] == targets
    assert list(model.state_dict()) == list(plain.state_dict())  # no new parameter or buffer: checkpoints as before
    assert model.lm_head.weight is model.wte.weight  # the tied head stays full precision
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(m):
        m.zero_grad()
        loss = F.cross_entropy(m(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        return loss, [p.grad.clone() for p in m.parameters()]

    at_step(model, 2)  # before quant.start_step: bit-identical to the plain model, forward and backward
    assert not qat_state(model).active
    a, b = loss_and_grads(plain), loss_and_grads(model)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))

    at_step(model, 3)
    rounded = copy.deepcopy(plain)  # the same model with every target's weight rounded onto the int4 grid
    with torch.no_grad():
        for name in targets:
            w = rounded.get_submodule(name).weight
            w.copy_(round_to_nearest(w, QuantSpec(4, 32)))
    a, b = loss_and_grads(rounded), loss_and_grads(model)
    assert not torch.equal(a[0], loss_and_grads(plain)[0])
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=0)
    for x, y in zip(a[1], b[1]):  # straight-through: the gradient of the rounded weight reaches the master weight
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["quant.bits=3"], "quant.bits=3 is not supported; use one of [4, 8]"),
        (["quant.group_size=48"], "quant.group_size=48 does not divide a linear layer's input width 64"),
        (["parallel.tp=2", "quant.group_size=64"], "per-rank input width 32 of the row-parallel blocks.0.attn.proj"),
        (["parallel.tp=2", "quant.group_size=0"], "quant.group_size=0 (one scale per row) with parallel.tp=2"),
        (["quant.method=gptq"], "quant.method='gptq' cannot be trained against"),
        (["quant.start_step=-1"], "quant.start_step must be >= 0"),
    ],
)
def test_bad_quant_section_is_a_config_error(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(ROOT / "recipes" / "gpt_debug.yaml", [*TINY, *QAT, *overrides])
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_bad_quant_input_exits_2_in_one_line(tmp_path):
    cmd = [sys.executable, TRAIN, str(ROOT / "recipes" / "gpt_debug.yaml"), *TINY, *QAT, "quant.bits=3"]
    proc = subprocess.run([*cmd, f"out_dir={tmp_path / 'r'}"], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: quant.bits=3 is not supported; use one of [4, 8]"]
    assert not (tmp_path / "r").exists()  # refused before anything was built or written


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "run"
    proc = train(out, f"train.max_steps={STEPS}", *QAT)
    assert "quantisation-aware training: int4" in proc.stdout
    return out


def test_qat_is_the_plain_run_until_start_step_then_quantised_and_learns(qat_run):
    got, plain = losses(qat_run), golden_losses()
    assert_losses_match({s: got[s] for s in (1, 2, 3)}, {s: plain[s] for s in (1, 2, 3)}, TOL)
    for step in (4, 5, 6):  # fake quantisation moves the loss by 1e-4 (step 4) to 1e-2 (step 6) on this run
        assert abs(got[step] - plain[step]) > 5 * TOL, (step, got[step], plain[step])
    assert got[6] < got[1] - 0.3, got


def test_qat_resume_is_exact(qat_run, tmp_path):
    """Stopped at step 3, the quantised phase starts on resume exactly where the uninterrupted run did."""
    part = tmp_path / "part"
    train(part, "train.max_steps=3", "checkpoint.interval=3", *QAT)
    proc = train(part, f"train.max_steps={STEPS}", *QAT)
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    a, b = losses(qat_run), losses(part)
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]  # bit-for-bit


def test_resume_refuses_another_grid(qat_run, tmp_path):
    proc = train(qat_run, f"train.max_steps={STEPS + 1}", *QAT, "quant.group_size=64", check=False)
    assert proc.returncode == 2
    assert "quant.group_size=64 (saved 32): the weights were trained against this quantisation grid" in proc.stderr


@pytest.mark.slow
def test_tp2_qat_matches_one_rank(qat_run, tmp_path):
    """Row-parallel shards (attn.proj, mlp.down) hold 32 of 64 / 128 of 256 input columns: whole groups of
    32, so each rank's scales are the whole weight's and the fake-quantised losses are the one-rank run's.
    (Without fake quantisation on the shards, step 4 would be 1e-4 and step 6 1e-2 off.)"""
    out = tmp_path / "tp2"
    proc = train(out, f"train.max_steps={STEPS}", *QAT, "parallel.tp=2", launcher="torchrun", nproc=2)
    assert "(dp 1 x tp 2 x pp 1)" in proc.stdout
    assert_losses_match(losses(out), losses(qat_run), TOL)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny freshly initialised teacher in the consolidated layout (what `llmtrain prune` writes)."""
    from llmtrain.compress.cli import write_model

    out = tmp_path_factory.mktemp("teacher") / "t"
    cfg = load_config(ROOT / "recipes" / "gpt_debug.yaml", TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights()
    write_model(out, cfg, model, {})
    return out


def _qad(out, teacher, *overrides, nproc=1):
    """recipes/qad_gpt_debug.yaml shrunk: a fresh 1 x 32 student of the tiny teacher, fake-quantised from step 1."""
    from helpers import BIN, free_port

    launch = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}"] if nproc > 1 else []
    cmd = [
        *(launch or [sys.executable]),
        str(ROOT / "launchers" / "distill.py"),
        str(ROOT / "recipes" / "qad_gpt_debug.yaml"),
        *TINY,
        "model.init_from=",
        "model.n_layer=1",
        "model.n_embd=32",
        "optim.lr=3e-3",
        "quant.group_size=32",
        "distill.alpha=0.5",
        f"distill.teacher={teacher}",
        f"out_dir={out}",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_qad_with_cached_teacher_logits_learns(tmp_path, teacher):
    """launchers/distill.py with the teacher's top-k logits cached and the student fake-quantised (int8)."""
    cache = [f"distill.cache_dir={tmp_path / 'cache'}", "distill.top_k=8", "quant.bits=8"]
    proc = _qad(tmp_path / "student", teacher, *cache, f"train.max_steps={STEPS}")
    assert "quantisation-aware training: int8" in proc.stdout and (tmp_path / "cache" / "meta.json").is_file()
    got = losses(tmp_path / "student")
    assert got[STEPS] < got[1] - 0.1, got


@pytest.mark.slow
def test_qad_with_a_zero3_teacher_equals_a_whole_teacher(tmp_path, teacher):
    """2 ranks, the int4 student on ZeRO-1: the teacher partitioned (ZeRO-3) or whole gives the same losses."""
    runs = {}
    for stage in (3, 0):
        out = tmp_path / f"t{stage}"
        _qad(out, teacher, "train.max_steps=3", "parallel.zero_stage=1", f"distill.teacher_zero_stage={stage}", nproc=2)
        runs[stage] = losses(out)
    assert sorted(runs[3]) == [1, 2, 3]
    assert_losses_match(runs[3], runs[0], TOL)


def test_from_qat_export_computes_the_fake_quantised_logits(qat_run, teacher, tmp_path, capsys):
    """`llmtrain quantize --method from-qat` packs the QAT run's weights on its own grid (int4, group 32 from
    its quant: section, whatever --bits says): the packed model's logits are the fake-quantised model's."""
    from llmtrain.cli import main
    from llmtrain.compress.quant.linear import QuantLinear
    from llmtrain.models.converters import build_converted_model
    from llmtrain.parallel.consolidate import load_model_weights

    out = tmp_path / "int4"
    assert (
        main(
            ["quantize", str(qat_run), "--method", "from-qat", "--bits", "8", "--out", str(out), "--eval-batches", "2"]
        )
        == 0
    )
    assert "int4 from-qat, group size 32" in capsys.readouterr().out
    cfg, weights = load_model_weights(qat_run)
    qat = build_model(cfg)
    qat.load_state_dict(weights)
    fake_quant(load_config(qat_run / "config.yaml").quant)(qat)
    at_step(qat, STEPS - 1)
    packed_cfg, packed_weights = load_model_weights(out)
    packed = build_converted_model(packed_cfg)
    packed.load_state_dict(packed_weights)
    fake = [n for n, m in qat.named_modules() if isinstance(m, FakeQuantLinear)]
    assert [n for n, m in packed.named_modules() if isinstance(m, QuantLinear)] == fake and len(fake) == 8
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = qat.eval()(ids), packed.eval()(ids)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item(), (a - b).abs().max()
    print(f"max |logit difference| packed vs fake-quantised: {(a - b).abs().max().item():.2e}")
    # a model trained without quant.bits (the tiny teacher) has no grid to export
    assert main(["quantize", str(teacher), "--method", "from-qat", "--out", str(tmp_path / "x")]) == 2
    assert "was not trained with quantisation-aware training" in capsys.readouterr().err
