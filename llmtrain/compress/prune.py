"""Structured pruning (Minitron style): rank heads, kv groups, MLP channels, hidden channels and whole
layers by importance, keep the best, and return a smaller valid ModelConfig with its state_dict.

Importance is measured once on the unpruned model, then every axis is pruned at the same time:
- `activation` (Minitron, Muralidharan et al. 2024): mean over calibration tokens of the L2 norm of
  each head's attention output, of |activation| of each MLP channel (the input of the down
  projection), and of |output| of each hidden channel summed over every normalisation layer; a layer's
  importance is 1 - cos(block input, block output) (ShortGPT's block influence).
- `magnitude` (baseline, no data): weight norms of the same rows and columns.

Shape legend:  C hidden width   nh query heads   nkv key/value heads   hs head size   F MLP width
Slicing works on state-dict names: every parameter name of a supported model maps to the axes it
carries (`_axes`, from the family's spec), so a parameter we do not know is an error rather than a silently unpruned tensor.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from llmtrain.compress.config import PruneConfig
from llmtrain.errors import UserError
from llmtrain.models import ModelConfig, build_model
from llmtrain.models.registry import family_of

# ---------------------------------------------------------------------------------------------
# Shapes


def head_size(cfg: ModelConfig) -> int:
    return getattr(cfg, "head_dim", None) or cfg.n_embd // cfg.n_head


def kv_heads(cfg: ModelConfig) -> int:
    return getattr(cfg, "n_kv_head", None) or cfg.n_head


def ffn_width(cfg: ModelConfig) -> int:
    return getattr(cfg, "intermediate_size", None) or 4 * cfg.n_embd


def target_config(cfg: ModelConfig, p: PruneConfig) -> ModelConfig:
    """The pruned model's config; ValueError naming the recipe key when a target is impossible."""
    if getattr(cfg, "moe", None) is not None:
        raise UserError(
            "pruning a mixture-of-experts model (model.moe) by layers, heads or widths is not implemented (the "
            "expert stacks would need their own axes); drop whole experts with the recipe key experts"
        )
    if p.experts is not None:
        raise UserError("prune recipe: experts needs a mixture-of-experts model (model.moe)")
    nh, nkv = cfg.n_head, kv_heads(cfg)
    new: dict[str, Any] = {
        "n_layer": p.n_layer or cfg.n_layer,
        "n_embd": p.n_embd or cfg.n_embd,
        "intermediate_size": p.intermediate_size or ffn_width(cfg),
    }
    group = nh // nkv
    new_nh = p.n_head or (p.n_kv_head * group if p.n_kv_head else nh)
    new_nkv = p.n_kv_head or (new_nh // group)
    for key, value, limit in (
        ("n_layer", new["n_layer"], cfg.n_layer),
        ("n_head", new_nh, nh),
        ("n_kv_head", new_nkv, nkv),
        ("n_embd", new["n_embd"], cfg.n_embd),
        ("intermediate_size", new["intermediate_size"], ffn_width(cfg)),
    ):
        if not 1 <= value <= limit:
            raise UserError(f"prune recipe: {key}={value} must be between 1 and the model's {limit}")
    if new_nh != new_nkv * group:
        raise UserError(
            f"prune recipe: n_head={new_nh} with n_kv_head={new_nkv} breaks the model's "
            f"{group} query heads per kv head; pick n_head as a multiple of {group} "
            f"(kv groups are pruned whole)"
        )
    family_of(cfg).prune_target(cfg, new, p)  # a family may fix a width its config leaves implicit
    hs = head_size(cfg)
    new["n_head"] = new_nh
    if new_nkv != new_nh or getattr(cfg, "n_kv_head", None):
        new["n_kv_head"] = new_nkv
    if new_nh * hs != new["n_embd"] or getattr(cfg, "head_dim", None):
        if not hasattr(cfg, "head_dim"):
            raise UserError(
                f"prune recipe: {new_nh} heads of {hs} != n_embd={new['n_embd']}, and this model "
                f"has no model.head_dim to decouple them; prune n_head and n_embd by the same factor"
            )
        new["head_dim"] = hs
    return dataclasses.replace(cfg, **new)


# ---------------------------------------------------------------------------------------------
# Importance


@dataclass
class Importance:
    layers: torch.Tensor  # (L,)
    heads: torch.Tensor  # (L, nh)
    channels: torch.Tensor  # (L, F)
    hidden: torch.Tensor  # (C,)


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"pruning supports models with a `blocks` list; {type(model).__name__} has none")
    return list(blocks)


def _attn_out(block: nn.Module) -> nn.Linear:
    return cast(nn.Linear, block.get_submodule("attn.proj"))


def _mlp(block: nn.Module) -> nn.Module:
    """The module holding up/down projections: `block.mlp` in decoders, the block itself in BERT."""
    return getattr(block, "mlp", block)


def _mlp_down(block: nn.Module) -> nn.Linear:
    return cast(nn.Linear, _mlp(block).get_submodule("down"))


def _mlp_up(block: nn.Module) -> nn.Linear:
    return cast(nn.Linear, _mlp(block).get_submodule("up"))


def _call(model: nn.Module, cfg: ModelConfig, batch: dict[str, torch.Tensor]) -> Any:
    return family_of(cfg).forward_inputs(model, batch)


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "norm" in type(m).__name__.lower()]


@torch.no_grad()
def activation_importance(model: nn.Module, cfg: ModelConfig, batches: Iterable[dict[str, torch.Tensor]]) -> Importance:
    """Accumulate Minitron activation statistics over calibration batches with forward hooks."""
    blocks, hs = _blocks(model), head_size(cfg)
    L, nh, C, F = len(blocks), cfg.n_head, cfg.n_embd, ffn_width(cfg)
    imp = Importance(torch.zeros(L), torch.zeros(L, nh), torch.zeros(L, F), torch.zeros(C))
    tokens = [0]
    handles = []

    def on_attn(i):
        def hook(_m, args):
            x = args[0].float()  # (B, T, nh*hs)
            imp.heads[i] += x.unflatten(-1, (nh, hs)).norm(dim=-1).sum(dim=(0, 1)).cpu()

        return hook

    def on_mlp(i):
        def hook(_m, args):
            imp.channels[i] += args[0].float().abs().sum(dim=(0, 1)).cpu()  # (F,)

        return hook

    def on_norm(_m, _args, out):
        imp.hidden.add_(out.float().abs().sum(dim=(0, 1)).cpu())

    def on_block(i):
        def hook(_m, args, out):
            cos = torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1)  # (B, T)
            imp.layers[i] += (1 - cos).sum().cpu()

        return hook

    for i, block in enumerate(blocks):
        handles += [
            _attn_out(block).register_forward_pre_hook(on_attn(i)),
            _mlp_down(block).register_forward_pre_hook(on_mlp(i)),
            block.register_forward_hook(on_block(i)),
        ]
    handles += [n.register_forward_hook(on_norm) for n in _norms(model)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            _call(model, cfg, batch)
            tokens[0] += batch["input_ids"].numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens[0] == 0:
        raise UserError("activation importance needs at least one calibration batch (prune recipe: calib_batches)")
    for t in (imp.layers, imp.heads, imp.channels, imp.hidden):
        t /= tokens[0]
    return imp


@torch.no_grad()
def magnitude_importance(model: nn.Module, cfg: ModelConfig) -> Importance:
    """Weight-norm ranking: a head's output-projection columns, a channel's up row x down column, a hidden
    channel's embedding column, a layer's output projections."""
    blocks, hs = _blocks(model), head_size(cfg)
    heads = torch.stack(
        [_attn_out(b).weight.float().unflatten(1, (cfg.n_head, hs)).norm(dim=(0, 2)) for b in blocks]
    ).cpu()
    channels = torch.stack(
        [_mlp_down(b).weight.float().norm(dim=0) * _mlp_up(b).weight.float().norm(dim=1) for b in blocks]
    ).cpu()
    layers = torch.stack(
        [_attn_out(b).weight.float().norm() + _mlp_down(b).weight.float().norm() for b in blocks]
    ).cpu()
    hidden = model.get_parameter("wte.weight").float().norm(dim=0).cpu()
    return Importance(layers, heads, channels, hidden)


# ---------------------------------------------------------------------------------------------
# Selection and slicing


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (so nothing pruned = identity)."""
    return torch.sort(torch.topk(scores, k).indices).values


@dataclass
class Keep:
    layers: torch.Tensor  # old block indices, ascending
    q_heads: list[torch.Tensor]  # per kept block: kept query heads
    kv_heads: list[torch.Tensor]  # per kept block: kept kv heads
    channels: list[torch.Tensor]  # per kept block: kept MLP channels
    hidden: torch.Tensor  # kept hidden channels


def select(cfg: ModelConfig, new: ModelConfig, imp: Importance) -> Keep:
    layers = _top(imp.layers, new.n_layer)
    group = cfg.n_head // kv_heads(cfg)
    q_heads, kv = [], []
    for i in layers.tolist():
        groups = _top(imp.heads[i].view(kv_heads(cfg), group).sum(dim=1), kv_heads(new))
        kv.append(groups)
        q_heads.append((groups[:, None] * group + torch.arange(group)).flatten())
    channels = [_top(imp.channels[i], ffn_width(new)) for i in layers.tolist()]
    return Keep(layers, q_heads, kv, channels, _top(imp.hidden, new.n_embd))


def _rows(heads: torch.Tensor, hs: int) -> torch.Tensor:
    return (heads[:, None] * hs + torch.arange(hs)).flatten()


def _axes(name: str, cfg: ModelConfig) -> tuple[str, tuple[str | None, ...]]:
    """(block-relative suffix or top-level name, axis kinds) for a parameter name. The kinds come from the
    model family's spec (`prune_block_axes` / `prune_top_axes`): C hidden, Q query-head rows, KV key/value-
    head rows, QKV fused rows, F MLP channels, None = keep whole; norms are recognised by name."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    suffix = m.group(2) if m else name
    if re.fullmatch(r"(.+\.)?((\w+_)?ln(_\w+)?|\w*norm\w*)\.(weight|bias)", suffix):
        return suffix, ("C",)
    family = family_of(cfg)
    table = family.prune_block_axes if m else family.prune_top_axes
    if suffix not in table:
        raise UserError(
            f"pruning does not know the parameter {name!r} of model.arch={family.name}; add it to "
            f"the family's prune axes (llmtrain/models/{family.name}/family.py)"
        )
    return suffix, table[suffix]


def slice_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, keep: Keep) -> dict[str, torch.Tensor]:
    """The pruned model's state_dict: kept blocks renumbered 0.., every tensor cut along its axes."""
    hs, nh, nkv = head_size(cfg), cfg.n_head, kv_heads(cfg)
    old_to_new = {old: new for new, old in enumerate(keep.layers.tolist())}
    out = {}
    for name, tensor in state.items():
        suffix, kinds = _axes(name, cfg)
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if m and int(m.group(1)) not in old_to_new:
            continue
        if m:
            j = old_to_new[int(m.group(1))]
            q, kv = _rows(keep.q_heads[j], hs), _rows(keep.kv_heads[j], hs)
            index = {
                "C": keep.hidden,
                "Q": q,
                "KV": kv,
                "F": keep.channels[j],
                "QKV": torch.cat([q, nh * hs + kv, (nh + nkv) * hs + kv]),
            }
        else:
            index = {"C": keep.hidden}
        for dim, kind in enumerate(kinds):
            if kind is not None:
                tensor = tensor.index_select(dim, index[kind].to(tensor.device))
        out[f"blocks.{j}.{suffix}" if m else name] = tensor.contiguous()
    return out


def prune(model: nn.Module, cfg: ModelConfig, recipe: PruneConfig, imp: Importance) -> tuple[ModelConfig, dict]:
    """Return (pruned config, pruned state_dict) of `model` for the recipe's targets and importances."""
    new = target_config(cfg, recipe)
    keep = select(cfg, new, imp)
    state = slice_state_dict(model.state_dict(), cfg, keep)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(new).state_dict().items()}
    if set(state) != set(shapes):  # our own invariant: slicing covers exactly the new model's parameters
        raise AssertionError(f"pruned state_dict mismatch: {sorted(set(state) ^ set(shapes))}")
    for name, tensor in state.items():
        if tensor.shape != shapes[name]:  # a family that derives a width instead of reading the config
            raise UserError(
                f"a {family_of(new).name} model of the pruned shape has {name} of {tuple(shapes[name])}, not "
                f"{tuple(tensor.shape)}: this family does not take that target from its config; "
                f"leave that prune key unset (e.g. intermediate_size for BERT, whose MLP is 4 * n_embd)"
            )
    return new, state


# ---------------------------------------------------------------------------------------------
# Whole experts of a mixture-of-experts model (prune.experts)


def _moe_blocks(model: nn.Module) -> list[Any]:
    from llmtrain.models.gpt.moe import MoE

    layers = [getattr(b, "mlp", None) for b in _blocks(model)]
    if not all(isinstance(m, MoE) for m in layers):
        raise UserError("prune recipe: experts needs a mixture-of-experts model (model.moe)")
    return layers


@torch.no_grad()
def expert_usage(model: nn.Module, cfg: ModelConfig, batches: Iterable[dict[str, torch.Tensor]] | None) -> torch.Tensor:
    """(L, E) importance of each block's experts: the share of router top-k assignments over `batches`, or
    without batches (method=magnitude) the router row's norm times the expert's weight norms."""
    layers = _moe_blocks(model)
    usage = torch.zeros(len(layers), layers[0].num_experts)
    if batches is None:
        for i, m in enumerate(layers):
            e = m.experts
            usage[i] = m.router.weight.float().norm(dim=1) * (
                e.gate.norm(dim=(1, 2)) + e.up.norm(dim=(1, 2)) + e.down.norm(dim=(1, 2))
            )
        return usage
    handles = []
    for i, m in enumerate(layers):

        def hook(_m, _args, out, i=i, k=m.top_k, n=m.num_experts):
            usage[i] += torch.bincount(out.topk(k, dim=-1).indices.flatten().cpu(), minlength=n).float()

        handles.append(m.router.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            _call(model, cfg, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if usage.sum() == 0:
        raise UserError("expert usage needs at least one calibration batch (prune recipe: calib_batches)")
    return usage / usage.sum(dim=1, keepdim=True)


def prune_experts(
    model: nn.Module, cfg: ModelConfig, recipe: PruneConfig, usage: torch.Tensor
) -> tuple[ModelConfig, dict]:
    """(config with moe.num_experts = recipe.experts, state_dict) keeping each block's most used experts, in
    their order. The router keeps those rows: a token whose top-k experts all stay is routed as before, with
    the same renormalised weights."""
    moe, n = getattr(cfg, "moe", None), recipe.experts
    others = [k for k in ("n_layer", "n_head", "n_kv_head", "intermediate_size", "n_embd") if getattr(recipe, k)]
    if others:
        raise UserError(f"prune recipe: experts prunes on its own; unset {', '.join(others)} (or prune in two runs)")
    if moe is None or n is None:
        raise UserError("prune recipe: experts needs a mixture-of-experts model (model.moe)")
    if not 1 <= n <= moe.num_experts:
        raise UserError(f"prune recipe: experts={n} must be between 1 and the model's {moe.num_experts}")
    state = dict(model.state_dict())
    for i in range(usage.size(0)):
        keep = _top(usage[i], n)
        for suffix in ("router.weight", "experts.gate", "experts.up", "experts.down"):
            name = f"blocks.{i}.mlp.{suffix}"
            state[name] = state[name].index_select(0, keep).contiguous()
    new_moe = dataclasses.replace(moe, num_experts=n, top_k=min(moe.top_k, n))
    return dataclasses.replace(cfg, moe=new_moe), state  # type: ignore[call-arg]


def num_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())
