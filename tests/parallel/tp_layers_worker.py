"""Run by test_tensor_parallel.py under `torchrun --nproc_per_node 2`: the tensor-parallel GPT and BERT
against unsharded copies of themselves, layer by layer and end to end (outputs, loss, gradients). Exits
non-zero on the first mismatch."""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from llmtrain.models import ModelConfig, build_model
from llmtrain.parallel.tensor_parallel import (
    GPT_TP_PLAN,
    LLAMA_TP_PLAN,
    apply_tensor_parallel,
    full_logits,
    loss_context,
    plan_for,
)
from llmtrain.train.objectives import objective_for

# fp32 on CPU; a sharded matmul sums the same products in a different order than the full one, so
# results differ by a few ulps (~1e-7 relative); 1e-5 absolute / 1e-4 relative leaves room for that.
TOL = dict(atol=1e-5, rtol=1e-4)
SHAPE = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=96, block_size=16)
# GPT-2 flavour, and Llama flavour with grouped-query attention (4 query heads on 2 kv heads) and SwiGLU
FLAVOURS = [
    (ModelConfig(**SHAPE), GPT_TP_PLAN),
    (
        ModelConfig(**SHAPE, n_kv_head=2, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, intermediate_size=48),
        LLAMA_TP_PLAN,
    ),
]
BERT = ModelConfig(**SHAPE, arch="bert", norm_eps=1e-12)
# BERT pre-training (MLM decoder tied to the word embedding, and untied), and the sequence classifier
BERT_FLAVOURS = {
    "bert tied": BERT,
    "bert untied": ModelConfig(**{**vars(BERT), "tie_embeddings": False}),
    "bert classifier": ModelConfig(**{**vars(BERT), "num_labels": 3}),
}


def main() -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (size,), mesh_dim_names=("tp",))
    group = mesh.get_group()
    for cfg, plan in FLAVOURS:
        loss = _check(cfg, plan, rank, size, mesh, group)
        if rank == 0:
            print(f"{cfg.mlp}: tensor-parallel layers match the unsharded model on {size} ranks: loss {loss:.6f}")
    for label, cfg in BERT_FLAVOURS.items():
        loss = _check_bert(cfg, rank, size, mesh, group)
        if rank == 0:
            print(f"{label}: tensor-parallel layers match the unsharded model on {size} ranks: loss {loss:.6f}")
    dist.barrier()  # no rank tears gloo down while the other still has an operation in flight
    dist.destroy_process_group()
    # Once in CI both ranks aborted after this point ("terminate called without an active exception"):
    # gloo/DeviceMesh threads racing interpreter shutdown, after every check above had passed. Leave
    # without running that shutdown; the checks and their output are complete.
    sys.stdout.flush()
    os._exit(0)


def _check(cfg: ModelConfig, plan: dict, rank: int, size: int, mesh, group) -> float:
    torch.manual_seed(0)
    ref = build_model(cfg)
    ref.init_weights()
    tp = copy.deepcopy(ref)
    replaced = apply_tensor_parallel(tp, plan, group, mesh)
    assert "blocks.0.attn.qkv" in replaced and "lm_head" in replaced, replaced
    assert tp.lm_head.weight is tp.wte.weight  # the tie survives sharding
    x = torch.randint(0, 96, (2, 16))
    y = torch.randint(0, 96, (2, 16))
    y[0, :3] = -100  # ignored targets take the same path in the parallel loss

    _check_block(ref, tp, (2, 16, 32))

    # the whole model: logits, loss through the vocab-parallel cross-entropy, every gradient
    logits = ref(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    loss.backward()
    with loss_context(size):
        logits_tp = tp(x)
        assert logits_tp.to_local().shape[-1] == 96 // size  # never the full vocabulary on a rank
        loss_tp = F.cross_entropy(logits_tp.float().flatten(0, 1), y.flatten(), ignore_index=-100)
        loss_tp.backward()
    torch.testing.assert_close(full_logits(logits_tp), logits, **TOL)
    torch.testing.assert_close(loss_tp.full_tensor() if hasattr(loss_tp, "full_tensor") else loss_tp, loss, **TOL)
    ref_params = dict(ref.named_parameters())
    for name, p in tp.named_parameters():
        g_ref = ref_params[name].grad
        if getattr(p, "tensor_model_parallel", False):
            g_ref = _slice_like(name, g_ref, rank, size, cfg)
        torch.testing.assert_close(p.grad, g_ref, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    return loss.item()


def _check_block(ref, tp, shape: tuple[int, ...], *args) -> None:
    """Block 0 of both models: the same output and the same input-gradient; parameter grads cleared after."""
    h = torch.randn(*shape, requires_grad=True)
    h_tp = h.detach().clone().requires_grad_(True)
    out, out_tp = ref.blocks[0](h, *args), tp.blocks[0](h_tp, *args)
    torch.testing.assert_close(out_tp, out, **TOL)
    out.pow(2).sum().backward()
    out_tp.pow(2).sum().backward()
    torch.testing.assert_close(h_tp.grad, h.grad, **TOL)
    ref.zero_grad(set_to_none=True)
    tp.zero_grad(set_to_none=True)


def _check_bert(cfg: ModelConfig, rank: int, size: int, mesh, group) -> float:
    """The plan of the model class (plan_for), the objective the trainer runs, every gradient."""
    torch.manual_seed(0)
    ref = build_model(cfg)
    ref.init_weights()
    with torch.no_grad():  # biases start at zero, which would hide a misplaced shard (e.g. of the MLM bias)
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    tp = copy.deepcopy(ref)
    replaced = apply_tensor_parallel(tp, plan_for(tp), group, mesh)
    pretrain = cfg.num_labels == 0
    assert {"wte", "blocks.1.attn.qkv", "blocks.1.down"} <= set(replaced), replaced
    assert ("lm_head" in replaced) == pretrain, replaced
    assert tp.blocks[0].attn.n_head == cfg.n_head // size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (3, 16), generator=g)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 11:] = 0  # a padded row
    mlm_labels = torch.full((3, 16), -100)
    mlm_labels[:, 1::4] = ids[:, 1::4]
    batch = {
        "input_ids": ids,
        "token_type_ids": (torch.arange(16) >= 8).long().expand(3, 16),
        "attention_mask": mask,
        "mlm_labels": mlm_labels,
        "nsp_labels": torch.tensor([0, 1, 1]),
    }
    if not pretrain:
        batch = {**batch, "class_labels": torch.tensor([2, 0, 1])}

    _check_block(ref, tp, (3, 16, 32), mask.bool()[:, None, None, :])  # with the padding mask

    # the whole model through the trainer's objective (MLM + NSP, or classification), every gradient
    loss = objective_for("bert")(ref, batch)
    loss.backward()
    with loss_context(size):
        loss_tp = objective_for("bert")(tp, batch)
        loss_tp.backward()
        if pretrain:
            with torch.no_grad():
                mlm, nsp = ref(ids, batch["token_type_ids"], mask, mlm_labels != -100)
                mlm_tp, nsp_tp = tp(ids, batch["token_type_ids"], mask, mlm_labels != -100)
            assert mlm_tp.to_local().shape == (mlm.shape[0], 96 // size)  # (N, V / tp) on each rank
            torch.testing.assert_close(full_logits(mlm_tp), mlm, **TOL)
            torch.testing.assert_close(nsp_tp, nsp, **TOL)
    assert type(loss_tp) is torch.Tensor  # a plain tensor: the runner adds and all-reduces it
    torch.testing.assert_close(loss_tp, loss, **TOL)
    ref_params = dict(ref.named_parameters())
    sharded = set()
    for name, p in tp.named_parameters():
        g_ref = ref_params[name].grad
        if getattr(p, "tensor_model_parallel", False):
            sharded.add(name)
            dim, index = p.llmtrain_tp_shard  # what checkpoints gather by: the same slice of the whole tensor
            torch.testing.assert_close(ref_params[name].detach().index_select(dim, index), p.detach(), rtol=0, atol=0)
            g_ref = _slice_like(name, g_ref, rank, size, cfg)
        torch.testing.assert_close(p.grad, g_ref, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    expected = {
        "wte.weight",
        *(
            f"blocks.{i}.{n}"
            for i in range(cfg.n_layer)
            for n in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "up.weight", "up.bias", "down.weight")
        ),
    }
    if pretrain:  # BERT's output bias is split with the vocabulary, the decoder weight too when untied
        expected |= {"lm_head.bias"} | (set() if cfg.tie_embeddings else {"lm_head.weight"})
    assert sharded == expected, sorted(sharded ^ expected)
    return loss.item()


def _slice_like(name: str, full: torch.Tensor, rank: int, size: int, cfg: ModelConfig) -> torch.Tensor:
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        hs, kv = cfg.n_embd // cfg.n_head, getattr(cfg, "n_kv_head", None) or cfg.n_head  # BERT has no kv heads
        parts = full.split([cfg.n_head * hs, kv * hs, kv * hs], dim=0)  # [q; k; v]: this rank holds its heads of each
        return torch.cat([p.chunk(size, dim=0)[rank] for p in parts])
    dim = 1 if (name.endswith("proj.weight") or name.endswith("down.weight")) else 0
    return full.chunk(size, dim=dim)[rank]


if __name__ == "__main__":
    sys.exit(main())
