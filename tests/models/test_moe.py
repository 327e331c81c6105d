"""Mixture of experts (model.moe, llmtrain/models/gpt/moe.py) on one process: the layer against transformers'
MixtralSparseMoeBlock, capacity drops, the router losses through the objective, a dense model unchanged, and
the config checks of model.moe / parallel.ep (one line, exit 2, nothing built)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ROOT, TINY

from llmtrain.config import ConfigError, derive, load_config
from llmtrain.models.gpt.config import GPTConfig
from llmtrain.models.gpt.model import GPT
from llmtrain.models.gpt.moe import MoE, MoEConfig
from llmtrain.models.gpt.objective import CausalLM


def _cfg(**moe) -> GPTConfig:
    return GPTConfig(
        name="t", arch="gpt", n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16, dropout=0.0,
        bias=False, pos="rope", norm="rmsnorm", mlp="swiglu", intermediate_size=48, moe=moe or None,
    )  # fmt: skip


def test_layer_matches_transformers_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    layer = MoE(32, 48, MoEConfig(num_experts=4, top_k=2))
    layer.init_weights(0.2, 0.2)
    hf = MixtralSparseMoeBlock(
        MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    ).eval()
    with torch.no_grad():
        hf.gate.weight.copy_(layer.router.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([layer.experts.gate, layer.experts.up], dim=1))
        hf.experts.down_proj.copy_(layer.experts.down)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), hf(x), rtol=1e-5, atol=1e-6)


def test_capacity_drops_later_tokens_and_reports_the_fraction():
    torch.manual_seed(0)
    layer = MoE(16, 24, MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5))
    layer.init_weights(0.5, 0.5)
    x = torch.randn(40, 16)
    top_i, _, keep = layer.route(x)
    capacity = math.ceil(0.5 * 40 * 2 / 4)  # 10 assignments per expert
    for e in range(4):
        routed = (top_i == e).flatten()
        kept = (keep & (top_i == e)).flatten()
        assert int(kept.sum()) == min(capacity, int(routed.sum()))
        # the kept ones are the first `capacity` in token order
        assert torch.equal(kept, routed & (routed.cumsum(0) <= capacity))
    assert float(layer.aux["dropped"]) == pytest.approx(1 - float(keep.float().mean()))
    assert float(layer.aux["dropped"]) > 0
    # a dropped assignment contributes nothing: zero every kept weight, and the output is zero
    y = layer.dispatch(x, top_i, torch.ones_like(top_i, dtype=x.dtype), torch.zeros_like(keep))
    assert torch.equal(y, torch.zeros_like(y))


def test_router_losses_join_the_training_loss_and_are_reported():
    torch.manual_seed(0)
    model = GPT(_cfg(num_experts=4, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.25, shared_expert=True))
    model.init_weights()
    ids = torch.randint(0, 64, (2, 16))
    obj = CausalLM()
    loss = obj(model, {"input_ids": ids, "labels": ids})
    m = obj.pop_metrics(True)
    assert set(m) == {"lm_loss", "moe_balance_loss", "moe_z_loss", "moe_dropped"}
    assert float(loss.detach()) == pytest.approx(
        float(m["lm_loss"] + 0.5 * m["moe_balance_loss"] + 0.25 * m["moe_z_loss"])
    )
    assert float(m["moe_balance_loss"]) >= 1.0 - 1e-6  # E * sum f_e P_e is 1 when balanced, more otherwise
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():  # eval: the cross-entropy alone (perplexity stays a perplexity)
        ev = obj(model, {"input_ids": ids, "labels": ids})
    assert float(ev) == pytest.approx(float(obj.pop_metrics(False)["lm_loss"]))


def test_dense_model_is_unchanged():
    torch.manual_seed(0)
    model = GPT(_cfg())
    model.init_weights()
    assert not any(isinstance(m, MoE) for m in model.modules())
    obj = CausalLM()
    ids = torch.randint(0, 64, (2, 16))
    obj(model, {"input_ids": ids, "labels": ids})
    assert obj.pop_metrics(True) == {}


BASE = [f"{ROOT}/recipes/moe_debug.yaml"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.ep=3"], r"model.moe.num_experts=4 is not divisible by parallel.ep=3"),
        (["parallel.tp=2"], r"model.moe needs parallel.tp=1"),
        (["parallel.pp=2"], r"model.moe needs parallel.pp=1"),
        (["parallel.ep=2", "parallel.zero_stage=3"], r"parallel.ep=2 works with parallel.zero_stage 0, 1 or 2"),
        (["parallel.ep=2", "precision=bf16"], r"parallel.ep=2 with precision=bf16 needs parallel.zero_stage 1 or 2"),
        (["model.moe.top_k=5"], r"model.moe.top_k=5 exceeds model.moe.num_experts=4"),
        (["model.moe.capacity_factor=-1"], r"model.moe.capacity_factor must be a number >= 0"),
        (["model.mlp=gelu"], r"model.moe: experts are SwiGLU MLPs"),
    ],
)
def test_bad_moe_layouts_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BASE[0], overrides)


def test_ep_must_divide_the_data_parallel_size():
    cfg = load_config(BASE[0], ["parallel.ep=2", "train.micro_batch_size=1", "train.global_batch_size=12"])
    assert derive(cfg, 4).dims.ep == 2
    with pytest.raises(ConfigError, match=r"parallel.ep=2 does not divide the data-parallel size 3"):
        derive(cfg, 3)


def test_ep_without_moe_exits_2_before_anything_runs(tmp_path, capsys):
    from llmtrain.cli import main

    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / "llama_debug.yaml"), *TINY, f"out_dir={out}", "parallel.ep=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: parallel.ep=2 splits mixture-of-experts layers")
    assert not out.exists()


def test_flops_and_plan_count_active_parameters():
    """A token runs through top_k of num_experts experts: FLOPs count that share of the expert stacks (on a
    model built on meta and materialised, as the trainer does), and `llmtrain plan` reports it."""
    from llmtrain.models.gpt.moe import active_numel
    from llmtrain.plan import format_plan, make_plan
    from llmtrain.train import flops

    cfg = _cfg(num_experts=4, top_k=1)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    dense = GPT(_cfg())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert sum(active_numel(p) for p in model.parameters()) == pytest.approx(
        sum(p.numel() for p in model.parameters()) - 3 * experts / 4
    )
    # top_1 of 4 experts of the dense MLP's width: the dense model's FLOPs plus the router's
    router = sum(p.numel() for n, p in model.named_parameters() if "router" in n)
    got, _ = flops.flops_per_token(model, 2, 32, 16)
    want, _ = flops.flops_per_token(dense, 2, 32, 16)
    assert got == pytest.approx(want + 6 * router)
    plan = make_plan(load_config(BASE[0], ["parallel.ep=2", "train.global_batch_size=64"]), "moe_debug", 1, 8, 80)
    assert plan.params_active < plan.params_total and ", ep 2)" in format_plan(plan)
    assert "B active per token)" in format_plan(plan)
    # each ep rank holds num_experts/ep of the routed experts (expert_parallel.py slices them)
    one = make_plan(load_config(BASE[0], ["train.global_batch_size=64"]), "moe_debug", 1, 8, 80)
    with torch.device("meta"):
        moe_model = GPT(load_config(BASE[0]).model)
    routed = sum(p.numel() for n, p in moe_model.named_parameters() if ".experts." in n)
    assert routed > 0 and one.params_per_gpu == one.params_total
    assert plan.params_per_gpu == pytest.approx(one.params_total - routed / 2)
    assert plan.model_states_gib["params"] < one.model_states_gib["params"]


def test_moe_student_distils_from_an_moe_teacher_and_logs_its_router():
    """Distillation wraps CausalLM.scored, so a mixture-of-experts student's router losses join its loss and
    its moe_* metrics are reported (the teacher's router statistics are not)."""
    from llmtrain.compress.config import DistillConfig
    from llmtrain.compress.distill import Distill

    torch.manual_seed(0)
    teacher_cfg, student_cfg = _cfg(num_experts=4, top_k=2), _cfg(num_experts=2, top_k=1, capacity_factor=1.0)
    teacher, student = GPT(teacher_cfg), GPT(student_cfg)
    teacher.init_weights(), student.init_weights()
    teacher.eval().requires_grad_(False)
    objective = Distill(DistillConfig(alpha=0.5, temperature=2.0), student_cfg, teacher, teacher_cfg)
    objective.attach(student)
    ids = torch.randint(0, 64, (2, 16))
    loss = objective(student, {"input_ids": ids, "labels": ids.roll(-1, 1)})
    loss.backward()
    assert student.blocks[0].mlp.router.weight.grad is not None
    metrics = objective.pop_metrics(True)
    assert {"kd_loss", "ce_loss", "moe_balance_loss", "moe_dropped"} <= set(metrics)
    assert float(metrics["moe_dropped"]) == pytest.approx(
        float(student.blocks[1].mlp.aux["dropped"] + student.blocks[0].mlp.aux["dropped"]) / 2
    )


def test_pruning_an_moe_model_is_refused_but_for_whole_experts():
    from llmtrain.compress.config import PruneConfig
    from llmtrain.compress.prune import target_config
    from llmtrain.errors import UserError

    with pytest.raises(UserError, match=r"drop whole experts with the recipe key experts"):
        target_config(_cfg(num_experts=4, top_k=2), PruneConfig(n_layer=1))
    with pytest.raises(UserError, match=r"experts needs a mixture-of-experts model"):
        target_config(_cfg(), PruneConfig(experts=2))


def test_prune_experts_drops_the_least_used_and_keeps_the_routing_of_the_rest():
    """Usage is the share of router top-k assignments; pruning 4 -> 3 experts drops the least used one, and
    every token whose top-2 did not include it gets the same logits (same experts, same renormalised
    weights) from the pruned one-block model."""
    import dataclasses

    from llmtrain.compress.config import PruneConfig
    from llmtrain.compress.prune import expert_usage, prune_experts

    torch.manual_seed(0)
    cfg = dataclasses.replace(_cfg(num_experts=4, top_k=2), n_layer=1)
    model = GPT(cfg).eval()
    model.init_weights()
    ids = torch.randint(0, 64, (2, 16))
    seen = []
    hook = model.blocks[0].mlp.router.register_forward_hook(lambda m, a, out: seen.append(out.topk(2).indices))
    usage = expert_usage(model, cfg, [{"input_ids": ids}])
    hook.remove()
    top = seen[0]  # (N, 2)
    want = torch.bincount(top.flatten(), minlength=4).float() / top.numel()
    torch.testing.assert_close(usage[0], want)
    new_cfg, state = prune_experts(model, cfg, PruneConfig(experts=3), usage)
    dropped = int(usage[0].argmin())
    assert new_cfg.moe.num_experts == 3 and state["blocks.0.mlp.experts.gate"].shape[0] == 3
    small = GPT(new_cfg).eval()
    small.load_state_dict(state)
    untouched = ~(top == dropped).any(dim=1)  # (N,)
    assert untouched.any() and not untouched.all()
    with torch.no_grad():
        a, b = small(ids).flatten(0, 1), model(ids).flatten(0, 1)
    torch.testing.assert_close(a[untouched], b[untouched], rtol=1e-5, atol=1e-6)
    assert expert_usage(model, cfg, None).shape == (1, 4)  # method=magnitude: weight norms, no data
