"""The decoder's objective: next-token cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtrain.models.objective import local_loss


class CausalLM:
    """Next-token cross-entropy; labels equal to -100 are ignored."""

    generative = True

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's logits (B, T, V) on the batch's inputs; data.doc_mask batches carry position_ids and
        doc_ids, so attention stays inside each packed document."""
        docs = {k: batch[k] for k in ("position_ids", "doc_ids") if k in batch}
        return model(batch["input_ids"], **docs)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(self.logits(model, batch), batch)

    def scored(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits of the scored positions (N, V), their labels (N,), this objective's loss) from one forward:
        what distillation compares with a teacher. Every position is scored (labels -100 are skipped later)."""
        logits = self.logits(model, batch).flatten(0, 1)  # (B*T, V)
        labels = batch["labels"].flatten()
        return logits, labels, local_loss(F.cross_entropy(logits.float(), labels, ignore_index=-100))

    @staticmethod
    def positions(batch: dict[str, torch.Tensor]) -> slice:
        """Index of the scored positions in a (B, T, ...) tensor of this batch: all of them."""
        return slice(None)
