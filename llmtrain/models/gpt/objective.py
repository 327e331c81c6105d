"""The decoder's objective: next-token cross-entropy (plus a mixture-of-experts model's router losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtrain.models.gpt.moe import moe_aux_losses, moe_layers
from llmtrain.models.objective import MetricSums, local_loss


class CausalLM:
    """Next-token cross-entropy; labels equal to -100 are ignored. With `model.moe` the router's load-balance
    loss and z-loss (means over the MoE layers, weighted by moe.aux_loss_coef / z_loss_coef) are added, and
    they and the fraction of dropped assignments are reported by `pop_metrics` (moe_balance_loss,
    moe_z_loss, moe_dropped, lm_loss: the cross-entropy alone)."""

    generative = True

    def __init__(self) -> None:
        self._metrics = MetricSums()

    def with_router_losses(self, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """`loss` plus the MoE router losses of the forward just run (unchanged for a dense model); an eval
        forward (no autograd) returns the cross-entropy alone, so eval_loss and perplexity stay comparable."""
        if not isinstance(model, torch.nn.Module):
            return loss  # a pipeline stage passes its logits as a callable (MoE refuses pipeline parallel)
        aux = moe_aux_losses(model)
        if aux is None:
            return loss
        layer = moe_layers(model)[0]
        self._metrics.add(
            lm_loss=loss, moe_balance_loss=aux["balance"], moe_z_loss=aux["z"], moe_dropped=aux["dropped"]
        )
        if not torch.is_grad_enabled():
            return loss
        return loss + layer.aux_loss_coef * aux["balance"] + layer.z_loss_coef * aux["z"]

    def pop_metrics(self, training: bool) -> dict[str, torch.Tensor]:
        return self._metrics.pop(training)

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's logits (B, T, V) on the batch's inputs; data.doc_mask batches carry position_ids and
        doc_ids, so attention stays inside each packed document."""
        docs = {k: batch[k] for k in ("position_ids", "doc_ids") if k in batch}
        return model(batch["input_ids"], **docs)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.with_router_losses(model, self.loss(self.logits(model, batch), batch))

    def scored(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits of the scored positions (N, V), their labels (N,), this objective's loss) from one forward:
        what distillation compares with a teacher. Every position is scored (labels -100 are skipped later)."""
        logits = self.logits(model, batch).flatten(0, 1)  # (B*T, V)
        labels = batch["labels"].flatten()
        loss = local_loss(F.cross_entropy(logits.float(), labels, ignore_index=-100))
        return logits, labels, self.with_router_losses(model, loss)

    @staticmethod
    def positions(batch: dict[str, torch.Tensor]) -> slice:
        """Index of the scored positions in a (B, T, ...) tensor of this batch: all of them."""
        return slice(None)
