"""Direct preference optimisation (Rafailov et al. 2023) as an Objective: `train.objective=dpo` in a recipe, run
by the same trainer as any loss, so every layout the objective allows, checkpoints, exact resume,
metrics.jsonl and preemption work unchanged.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

pi_c / pi_r: the policy's log-probability of the chosen / rejected answer, summed over its label tokens (labels
!= -100: the prompt and the padding are not scored); ref_*: the same under the frozen reference model
(llmtrain/finetune/reference.py: whole, ZeRO-3 or cached). beta * (pi - ref) is each answer's implicit reward;
the records of metrics.jsonl carry their means (`reward_chosen`, `reward_rejected`), `reward_accuracy` (share of
pairs whose chosen answer has the higher reward), `reward_margin` and the policy's `logp_chosen` / `logp_rejected`.

Batches: `chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels` (B, T each, labels the next
token or -100), as `llmtrain prepare-data --format preference` prepares them. Chosen and rejected answers run
through the model as one (2B, T) batch. Held-out evaluation is the same loss on the validation pairs.

Shape legend:  B pairs  T sequence  V vocabulary
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import ConfigError, DataError
from llmtrain.finetune.config import DPOConfig
from llmtrain.finetune.reference import PAIR_KEYS, ReferenceCache
from llmtrain.models.objective import MetricSums
from llmtrain.models.registry import family_of

if TYPE_CHECKING:
    from llmtrain.config import Config
    from llmtrain.models.config import ModelConfig


class LogitsObjective(Protocol):
    """A decoder family's objective as DPO uses it: the model's next-token logits of a batch."""

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO loss of B pairs from their (B,) summed log-probs, and its metrics (means over the pairs)."""
    chosen = beta * (policy_chosen - ref_chosen)  # (B,) implicit rewards
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    c, r = chosen.detach(), rejected.detach()
    metrics = {
        "reward_chosen": c.mean(),
        "reward_rejected": r.mean(),
        "reward_accuracy": (c > r).float().mean(),
        "reward_margin": (c - r).mean(),
        "logp_chosen": policy_chosen.detach().mean(),
        "logp_rejected": policy_rejected.detach().mean(),
    }
    return loss, metrics


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's label tokens, (rows,); logits (rows, T, V), labels (rows, T)."""
    logits = logits.float()
    keep = labels != -100
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (rows, T)
    per_token = picked - torch.logsumexp(logits, dim=-1)
    return (per_token * keep).sum(-1)


def check_pairs(batch: dict[str, torch.Tensor]) -> None:
    missing = [k for k in PAIR_KEYS if k not in batch]
    if missing:
        raise DataError(
            f"train.objective=dpo needs preference batches ({', '.join(PAIR_KEYS)}) but the data gives none of "
            f"{', '.join(missing)}; prepare the pairs with `llmtrain prepare-data --format preference` and set data.path"
        )


def _stack(a: torch.Tensor, b: torch.Tensor, fill: int) -> torch.Tensor:
    """(B, Ta) and (B, Tb) as one (2B, max(Ta, Tb)) tensor, the shorter padded on the right with `fill`."""
    t = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(x, (0, t - x.shape[1]), value=fill) for x in (a, b)])


def pair_logps(
    base: LogitsObjective, model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs under `model`, each (B,), from one (2B, T) forward of the family's
    objective `base`."""
    check_pairs(batch)
    ids = _stack(batch["chosen_input_ids"], batch["rejected_input_ids"], 0)
    labels = _stack(batch["chosen_labels"], batch["rejected_labels"], -100)
    logits = base.logits(model, {"input_ids": ids})  # (2B, T, V)
    chosen, rejected = sequence_logps(logits, labels).chunk(2)
    return chosen, rejected


class DPO:
    """Preference loss of the policy against a frozen reference (a module, a ZeRO-3 engine or a cache)."""

    generative = True
    perplexity = False  # the loss is a preference loss, not a token cross-entropy: exp(loss) means nothing
    headline_metrics = ("reward_accuracy", "reward_margin")  # the final `done:` line's figures after the loss

    def __init__(
        self,
        cfg: DPOConfig,
        policy_cfg: ModelConfig,
        reference: nn.Module | None = None,
        cache: ReferenceCache | None = None,
    ):
        if reference is None and cache is None:
            raise ConfigError(
                "train.objective=dpo needs a reference model: set dpo.reference or model.init_from "
                "(the policy's starting weights are the default reference), or a complete dpo.cache_dir"
            )
        family = family_of(policy_cfg)
        if not family.generative:
            raise ConfigError(
                f"train.objective=dpo scores answers token by token and needs a decoder; model.arch={family.name} "
                f"is not one (set model.arch to a decoder such as gpt)"
            )
        self.cfg, self.reference, self.cache = cfg, reference, cache
        self.base = cast(LogitsObjective, family.objective())
        self.sums = MetricSums()

    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_logps(self.base, model, batch)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        policy_c, policy_r = self.logps(model, batch)
        if self.cache is not None:
            ref_c, ref_r = self.cache.lookup(batch)
        else:
            assert self.reference is not None  # __init__: a reference or a cache
            with torch.no_grad():
                ref_c, ref_r = self.logps(self.reference, batch)
        loss, metrics = dpo_loss(policy_c, policy_r, ref_c, ref_r, self.cfg.beta)
        self.sums.add(**metrics)
        return loss

    def pop_metrics(self, training: bool) -> dict[str, torch.Tensor]:
        return self.sums.pop(training)


def validate_dpo(cfg: Config) -> None:
    """The dpo.* keys and the layouts DPO supports; ConfigError naming the key and the fix."""
    d = cfg.dpo
    if d.beta <= 0:
        raise ConfigError(f"dpo.beta must be > 0; got {d.beta}")
    if not d.reference and not cfg.model.init_from:
        raise ConfigError(
            "train.objective=dpo needs a reference model: set dpo.reference=<checkpoint, run, model or HF "
            "directory> or model.init_from (the policy's starting weights are then the reference)"
        )
    if d.reference_zero_stage not in (0, 3):
        raise ConfigError(
            f"dpo.reference_zero_stage must be 0 (whole reference on every rank) or 3 (partitioned over the "
            f"data-parallel ranks); got {d.reference_zero_stage}"
        )
    if d.reference_zero_stage == 3 and d.cache_dir:
        raise ConfigError(
            "dpo.cache_dir is built by rank 0 alone with the whole reference; set dpo.reference_zero_stage=0 "
            "(or dpo.cache_dir='')"
        )
    if cfg.parallel.pp > 1 or cfg.parallel.tp > 1 or cfg.parallel.cp > 1:
        raise ConfigError(
            "train.objective=dpo runs on data parallel with ZeRO 0-3 (the reference whole, ZeRO-3 or cached), "
            "not on a pipeline, tensor or context parallel (an answer's log-probability is summed over its whole "
            "sequence); set parallel.pp=1, parallel.tp=1 and parallel.cp=1"
        )
    if cfg.data.doc_mask:
        raise ConfigError("preference pairs are one answer per row; set data.doc_mask=false with train.objective=dpo")


def run_dpo(cfg: Config) -> dict[str, Any]:
    """Every rank calls this: load the reference (or its cache), then train the policy with the DPO objective."""
    import os

    from llmtrain.config import derive
    from llmtrain.finetune.reference import ensure_reference_cache, load_reference
    from llmtrain.parallel.engine import init_distributed
    from llmtrain.train.trainer import train

    validate_dpo(cfg)
    derived = derive(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # a bad layout fails before the reference loads
    info = init_distributed(cfg.parallel.collective_timeout_s)
    derived = derive(cfg, info.world_size)
    if cfg.dpo.cache_dir:
        base = cast(LogitsObjective, family_of(cfg.model).objective())
        cache = ensure_reference_cache(cfg, derived, info.device, lambda m, b: pair_logps(base, m, b))
        return train(cfg, DPO(cfg.dpo, cfg.model, cache=cache))
    reference, reference_cfg = load_reference(cfg, info.device)
    if reference_cfg.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"the reference {cfg.dpo.reference or cfg.model.init_from} has vocab_size={reference_cfg.vocab_size} but "
            f"model.vocab_size={cfg.model.vocab_size}; policy and reference must share the tokenizer"
        )
    return train(cfg, DPO(cfg.dpo, cfg.model, reference=reference))
