"""LoRA training through the real launcher: layouts, checkpoints that hold only what changed, exact resume,
the frozen base checked, the merged and PEFT exports of a trained run.

One base (TINY's shape, seeded weights, written as a model directory) and one 1-rank ZeRO-0 LoRA run of 6
steps are the reference. tp2 and ZeRO-3 on 2 ranks must give its per-step losses within 1e-5 (fp32: the
sharded matmuls and all-reduces add the same products in another order, as in test_tensor_parallel.py);
a resume on the saved layout must give them bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_losses_match, losses, train
from safetensors import safe_open

from llmtrain.config import load_config
from llmtrain.errors import CheckpointError
from llmtrain.interop.hf import export_hf
from llmtrain.interop.peft import export_adapter
from llmtrain.model_dir import write_model_dir
from llmtrain.models import build_model
from llmtrain.models.converters import build_converted_model
from llmtrain.models.lora import merge_lora
from llmtrain.parallel.consolidate import consolidate, init_model_from, load_model_weights
from llmtrain.parallel.universal import frozen_base

STEPS = 6
TOL = 1e-5
LORA = ["model.lora.rank=4", "optim.lr=1e-2", f"train.max_steps={STEPS}", f"optim.decay_steps={STEPS}"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = load_config("recipes/gpt_debug.yaml", TINY).model
    model = build_model(cfg)
    torch.manual_seed(7)
    model.init_weights()
    return write_model_dir(cfg, model.state_dict(), tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def ref(base, tmp_path_factory):
    """1 rank, ZeRO-0: checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("lora") / "run"
    proc = train(out, *LORA, f"model.init_from={base}", "checkpoint.interval=3")
    assert "model converters applied: lora" in proc.stdout
    return out


def _adapters(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if "lora" in k}


def test_checkpoint_holds_adapters_and_a_pointer_to_the_base(ref, base):
    ckpt = ref / "checkpoints" / "step_00000006"
    files = sorted(p.name for p in (ckpt / "universal").glob("*.safetensors"))
    assert len(files) == 2 * 4 * 2 and all(".lora_" in f for f in files)  # A and B of 4 linears x 2 blocks
    meta = json.loads((ckpt / "universal" / "meta.json").read_text())
    assert meta["base"]["path"] == str(base.resolve()) and len(meta["base"]["digest"]) == 64
    assert frozen_base(ckpt) == base.resolve()

    cfg, weights = load_model_weights(ref)  # the base rebuilt under the adapters
    model = build_converted_model(cfg)
    model.load_state_dict(weights)  # strict: every base weight and every adapter
    _, base_weights = load_model_weights(base)
    assert torch.equal(weights["blocks.1.mlp.down.weight"], base_weights["blocks.1.mlp.down.weight"])  # frozen
    assert weights["blocks.0.attn.qkv.lora_b"].abs().sum() > 0  # trained
    assert losses(ref)[STEPS] < losses(ref)[1]

    consolidate(ref, ref.parent / "consolidated")  # a model directory holds every weight itself
    cfg2, again = load_model_weights(ref.parent / "consolidated")
    assert cfg2.lora == cfg.lora and again.keys() == weights.keys()
    assert all(torch.equal(again[k], weights[k]) for k in weights)


def test_changed_or_missing_base_is_refused(ref, base):
    ckpt = ref / "checkpoints" / "step_00000003"
    checksums = base / "checksums.json"
    saved = checksums.read_text()
    body = json.loads(saved)
    body["files"]["config.yaml"]["sha256"] = "0" * 64  # as if the base had been written again
    checksums.write_text(json.dumps(body))
    try:
        with pytest.raises(CheckpointError, match="changed since the checkpoint was written"):
            frozen_base(ckpt)
    finally:
        checksums.write_text(saved)
    moved = base.parent / "moved"
    base.rename(moved)
    try:
        with pytest.raises(CheckpointError, match="holds only adapters over the frozen base .* which is missing"):
            load_model_weights(ckpt)
    finally:
        moved.rename(base)


def test_resume_is_exact(ref, base, tmp_path):
    """The step-3 checkpoint continued on the same layout: the same losses and adapters, bit for bit."""
    out = _continue_from(ref, 3, tmp_path / "run")
    proc = train(out, *LORA, f"model.init_from={base}", "checkpoint.interval=3")
    assert "frozen base weights read from" in proc.stdout and "resumed from" in proc.stdout
    a, b = losses(ref), losses(out)
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]
    got, want = _adapters(load_model_weights(out)[1]), _adapters(load_model_weights(ref)[1])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_run_moved_with_its_base_resumes(ref, base, tmp_path):
    """Run and base copied to another tree and the original base gone: the checkpoint finds the base by its
    path relative to the checkpoint, and the resume from step 3 is still exact."""
    meta = json.loads((ref / "checkpoints" / "step_00000003" / "universal" / "meta.json").read_text())
    common = Path(os.path.commonpath([ref.resolve(), base.resolve()]))
    assert (ref / "checkpoints" / "step_00000003" / meta["base"]["relative"]).resolve() == base.resolve()
    tree = tmp_path / "moved"
    shutil.copytree(base, tree / base.resolve().relative_to(common))
    out = _continue_from(ref, 3, tree / ref.resolve().relative_to(common))
    away = base.parent / "away"
    base.rename(away)
    try:
        assert frozen_base(out / "checkpoints" / "step_00000003") == (tree / base.resolve().relative_to(common))
        proc = train(out, *LORA, f"model.init_from={base}", "checkpoint.interval=3")  # the recipe's own init_from
    finally:
        away.rename(base)
    assert "frozen base weights read from " + str(tree) in proc.stdout and "resumed from" in proc.stdout
    a, b = losses(ref), losses(out)
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.zero_stage=3"]], ids=["tp2", "zero3_dp2"])
def test_two_rank_layouts_match_one_rank(ref, base, tmp_path, layout):
    out = tmp_path / "run"
    train(out, *LORA, f"model.init_from={base}", *layout, launcher="torchrun", nproc=2)
    assert_losses_match(losses(out), losses(ref), TOL)
    files = sorted(p.name for p in (out / "checkpoints" / "step_00000006" / "universal").glob("*.safetensors"))
    assert len(files) == 16 and all(".lora_" in f for f in files)  # gathered whole, by plain name
    got, want = _adapters(load_model_weights(out)[1]), _adapters(load_model_weights(ref)[1])
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)


def _continue_from(run, step: int, copy):
    """A copy of `run` whose newest checkpoint is `step` (what a run stopped there leaves)."""
    shutil.copytree(run, copy)
    for ckpt in (copy / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    for pointer in ("latest", "good"):
        (copy / "checkpoints" / pointer).write_text(f"step_{step:08d}\n")
    return copy


QLORA = ["model.converters=[quantized_weights]", "model.weight_quant.bits=4", "model.weight_quant.group_size=32"]


def test_qlora_without_a_base_stores_frozen_weights_and_resumes_exactly(tmp_path):
    """QLoRA on the seeded base (no model.init_from): the float frozen weights (embedding, norms, biases) are
    written weight-only, the int4 base is rebuilt by the converters, and a resume is bit-exact."""
    common = [*QLORA, "model.lora.rank=2", "model.lora.targets=[attn]", "optim.decay_steps=4", "train.max_steps=4"]
    full = tmp_path / "full"
    assert "model converters applied: quantized_weights, lora" in train(full, *common, "checkpoint.interval=2").stdout
    universal = full / "checkpoints" / "step_00000002" / "universal"
    assert json.loads((universal / "meta.json").read_text())["base"] is None
    with safe_open(str(universal / "wte.weight.safetensors"), "pt") as f:
        assert list(f.keys()) == ["fp32"]  # a weight without optimizer state
    assert not list(universal.glob("*weight_q*"))  # the packed base is never stored: the converter rebuilds it
    part = _continue_from(full, 2, tmp_path / "part")
    assert "resumed from" in train(part, *common, "checkpoint.interval=2").stdout
    assert [losses(part)[s] for s in (3, 4)] == [losses(full)[s] for s in (3, 4)]


def test_qlora_on_a_base_trains_and_merges_to_a_float_model(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    train(out, *QLORA, *LORA, f"model.init_from={base}")
    assert losses(out)[STEPS] < losses(out)[1]
    files = list((out / "checkpoints" / "step_00000006" / "universal").glob("*.safetensors"))
    assert len(files) == 16 and all(".lora_" in f.name for f in files)
    cfg, weights = load_model_weights(out)  # the int4 base rebuilt from the base's weights
    assert weights["blocks.0.mlp.up.weight_q"].dtype == torch.uint8
    model = build_converted_model(cfg)
    model.load_state_dict(weights)
    assert type(model.get_submodule("blocks.0.mlp.up")).__name__ == "LoRAQuantLinear"
    merged_cfg, merged = merge_lora(cfg, weights)
    assert merged_cfg.converters == [] and all(t.dtype == torch.float32 for t in merged.values())
    plain = build_model(merged_cfg)
    init_model_from(plain, out)  # a new run may start from it: the converters' unconvert merges the same way
    assert all(torch.equal(plain.state_dict()[k], merged[k]) for k in merged)
    export_hf(out, tmp_path / "hf")  # merged: a plain float transformers model
    ids = torch.randint(0, 8000, (2, 32))
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids), atol=1e-5, rtol=1e-5)


def test_trained_run_exports_merged_and_as_peft_adapter(ref, base, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    export_hf(base, tmp_path / "hf_base")
    export_hf(ref, tmp_path / "hf_merged")
    export_adapter(ref, tmp_path / "adapter")
    cfg, weights = load_model_weights(ref)
    model = build_converted_model(cfg)
    model.load_state_dict(weights)
    ids = torch.randint(0, 8000, (2, 32))
    with torch.no_grad():
        ours = model.eval()(ids)
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_merged").eval()
        torch.testing.assert_close(merged(ids).logits, ours, atol=1e-5, rtol=1e-5)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base").eval()
        adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()  # GPT-2: Conv1D targets
        torch.testing.assert_close(adapted(ids).logits, ours, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
