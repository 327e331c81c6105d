"""DPO (llmtrain/finetune/): log 2 when the policy is the reference, TRL's formula and a hand computation on a
fixed batch, a short run that learns the preference, the cached reference equal to the live one, and bad input
as one line with exit 2."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, TINY, env

from llmtrain.errors import CheckpointError, DataError
from llmtrain.finetune.config import DPOConfig
from llmtrain.finetune.dpo import DPO, dpo_loss, pair_logps, sequence_logps
from llmtrain.finetune.reference import ReferenceCache, build_reference_cache
from llmtrain.models import ModelConfig, build_model

TRAIN = str(ROOT / "launchers" / "train.py")
LLAMA = ModelConfig(
    n_layer=2,
    n_head=4,
    n_embd=32,
    vocab_size=61,
    block_size=32,
    pos="rope",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    n_kv_head=2,
    intermediate_size=48,
)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(LLAMA)
    model.init_weights()
    return model


def _pairs(n: int = 4, prompt: int = 5, answer: int = 4, pad: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """n pairs of a random prompt followed by a chosen or rejected answer, padded; labels are the next token on
    the answer's positions only (as prepared preference data has them), -100 on the prompt and the padding."""
    g = torch.Generator().manual_seed(seed)
    T = prompt + answer + pad
    batch = {}
    prompts = torch.randint(1, LLAMA.vocab_size, (n, prompt), generator=g)
    for side, lo, hi in (("chosen", 1, 30), ("rejected", 30, LLAMA.vocab_size)):
        ids = torch.zeros(n, T, dtype=torch.long)
        ids[:, :prompt] = prompts
        ids[:, prompt : prompt + answer] = torch.randint(lo, hi, (n, answer), generator=g)
        labels = torch.full((n, T), -100)
        labels[:, prompt - 1 : prompt + answer - 1] = ids[:, prompt : prompt + answer]
        batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids, labels
    return batch


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).eval().requires_grad_(False)


def test_loss_is_log2_when_the_policy_is_the_reference():
    policy = _model()
    objective = DPO(DPOConfig(beta=0.5), LLAMA, reference=_frozen(policy))
    policy.eval()  # no dropout in LLAMA anyway; the two forwards must be the same computation
    loss = objective(policy, _pairs())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    m = objective.pop_metrics(True)
    assert m["reward_margin"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["reward_chosen"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["logp_chosen"].item() < 0


def test_loss_and_log_probs_equal_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[3, -100, 6, 0], [-100, -100, 2, -100]])
    expected = [
        sum(math.log(torch.softmax(logits[r, t], -1)[labels[r, t]].item()) for t in range(4) if labels[r, t] >= 0)
        for r in range(2)
    ]
    torch.testing.assert_close(sequence_logps(logits, labels), torch.tensor(expected))
    pc, pr, rc, rr, beta = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0]), 0.2  # fmt: skip
    loss, m = dpo_loss(pc, pr, rc, rr, beta)
    z = [beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item() for i in range(2)]
    assert loss.item() == pytest.approx(sum(math.log(1 + math.exp(-x)) for x in z) / 2, rel=1e-6)
    assert m["reward_accuracy"].item() == 0.5  # pair 0: reward 0.1 vs -0.2; pair 1: -0.2 vs 0.2
    assert m["reward_margin"].item() == pytest.approx(sum(z) / 2, rel=1e-6)


def test_loss_matches_trl_on_a_fixed_batch():
    """TRL's own DPO loss (its DPOTrainer's `_compute_loss`, sigmoid loss, run on a transformers Llama carrying our
    weights through llmtrain.interop, with TRL's fused LM head for the log-probs) equals ours on one batch."""
    pytest.importorskip("trl", reason="trl is a test-only dependency (the dev extra)")
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from llmtrain.interop import family_for_config

    transformers = pytest.importorskip("transformers")
    policy, reference = _model(0), _model(1)  # two different models: a nonzero margin to compare
    batch, beta = _pairs(), 0.3

    def hf(model):
        hf_cfg, sd = family_for_config(LLAMA).to_hf(LLAMA, model.state_dict())
        out = transformers.LlamaForCausalLM(hf_cfg).eval()
        out.load_state_dict(sd, strict=False)
        out.tie_weights()
        add_fused_lm_head(out, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        return out

    # TRL's layout: [chosen; rejected] rows, labels = input_ids where completion_mask, shifted inside the model
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    completion = torch.zeros_like(ids)
    completion[:, 1:] = (labels[:, :-1] != -100).long()  # the token each scored position predicts
    trainer = SimpleNamespace(
        model=hf(policy),
        ref_model=hf(reference),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m
        ),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        use_weighting=False,
        label_smoothing=0.0,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
    expected = DPOTrainer._compute_loss(trainer, trainer.model, inputs, False)
    objective = DPO(DPOConfig(beta=beta), LLAMA, reference=_frozen(reference))
    got = objective(policy.eval(), batch)
    assert abs(expected.item() - math.log(2)) > 1e-3  # policy != reference: a real comparison
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
    ours = objective.pop_metrics(True)
    assert ours["reward_margin"].item() == pytest.approx(trainer._metrics["eval"]["rewards/margins"][0], abs=1e-5)


def test_a_short_run_learns_the_preference():
    policy = _model()
    objective = DPO(DPOConfig(beta=0.5), LLAMA, reference=_frozen(policy))
    batch = _pairs(n=8)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    first = None
    for _ in range(12):
        loss = objective(policy, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else (loss.item(), objective.pop_metrics(True))
    last = objective(policy, batch).item(), objective.pop_metrics(True)
    assert first is not None and first[0] == pytest.approx(math.log(2), abs=1e-6)
    assert last[0] < 0.5 * math.log(2), last
    assert first[1]["reward_accuracy"].item() == 0.0 and last[1]["reward_accuracy"].item() == 1.0
    assert last[1]["reward_chosen"] > 0 > last[1]["reward_rejected"]


def test_eval_reports_dpo_figures_and_no_perplexity():
    from llmtrain.models.registry import family_of
    from llmtrain.train.trainer import done_line, eval_record

    extra = {"eval_reward_accuracy": 0.75, "eval_reward_margin": 0.5}
    dpo = DPO(DPOConfig(), LLAMA, reference=_model())
    record, line = eval_record(dpo, 7, 0.6, extra)
    assert record == {"step": 7, "eval_loss": 0.6, **extra} and "perplexity" not in line
    assert (
        done_line(dpo, record) == "done: step 7 | held-out loss 0.6000 | reward_accuracy 0.7500 | reward_margin 0.5000"
    )
    record, line = eval_record(family_of(LLAMA).objective(), 7, 0.6, {})  # a token cross-entropy keeps its perplexity
    assert record["eval_ppl"] == pytest.approx(math.exp(0.6)) and "perplexity 1.82" in line
    assert done_line(family_of(LLAMA).objective(), record).endswith("| perplexity 1.82")


def test_the_cached_reference_gives_the_live_references_losses(tmp_path):
    policy, reference = _model(0), _frozen(_model(1))
    batches = [_pairs(seed=s) for s in range(3)]
    live = DPO(DPOConfig(), LLAMA, reference=reference)
    build_reference_cache(
        tmp_path / "cache", lambda mb: pair_logps(live.base, reference, mb), batches + batches[:1], {"describe": "test"}
    )
    cached = DPO(DPOConfig(), LLAMA, cache=ReferenceCache(tmp_path / "cache"))
    for mb in batches:
        torch.testing.assert_close(cached(policy, mb), live(policy, mb), rtol=0, atol=0)
    assert ReferenceCache(tmp_path / "cache").meta["rows"] == 12  # the repeated batch is stored once
    with pytest.raises(Exception, match="not in the reference cache"):
        cached(policy, _pairs(seed=9))
    (tmp_path / "cache" / ReferenceCache.FILE).write_bytes(b"damaged")
    with pytest.raises(CheckpointError):
        ReferenceCache(tmp_path / "cache")


def test_batches_without_pairs_are_a_data_error():
    policy = _model()
    batch = _pairs()
    del batch["rejected_labels"]
    with pytest.raises(DataError, match="rejected_labels.*prepare-data --format preference"):
        DPO(DPOConfig(), LLAMA, reference=_frozen(policy))(policy, batch)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["dpo.beta=0"], "dpo.beta must be > 0"),
        (["dpo.reference_zero_stage=2"], "dpo.reference_zero_stage must be 0"),
        (["dpo.reference_zero_stage=3", "dpo.cache_dir=x"], "dpo.cache_dir is built by rank 0"),
        (["parallel.cp=2"], "context parallel"),  # refused at load time already
        (["data.doc_mask=true"], "data.doc_mask=false"),
    ],
)
def test_dpo_settings_are_checked(overrides, match):
    from llmtrain.config import load_config
    from llmtrain.errors import ConfigError
    from llmtrain.finetune.dpo import validate_dpo

    with pytest.raises(ConfigError, match=match):
        validate_dpo(load_config(ROOT / "recipes" / "dpo_llama_debug.yaml", overrides))


def _cli(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, TRAIN, str(ROOT / "recipes" / "gpt_debug.yaml"), *TINY, f"out_dir={tmp_path / 'run'}"]
    return subprocess.run(
        [*cmd, "train.objective=dpo", *overrides], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120
    )


def test_no_reference_and_no_pairs_are_one_line_exit_2(tmp_path):
    proc = _cli(tmp_path)  # no model.init_from, no dpo.reference
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: train.objective=dpo needs a reference model: set dpo.reference=<checkpoint, run, model or HF "
        "directory> or model.init_from (the policy's starting weights are then the reference)"
    ]
    # a reference, but plain text data (no chosen/rejected pairs): one line naming the keys and the fix
    from llmtrain.config import load_config
    from llmtrain.model_dir import write_model_dir

    cfg = load_config(ROOT / "recipes" / "gpt_debug.yaml", TINY).model
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    write_model_dir(cfg, model.state_dict(), tmp_path / "ref")
    proc = _cli(tmp_path, f"dpo.reference={tmp_path / 'ref'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "prepare-data --format preference" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
