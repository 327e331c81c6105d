"""BERT's objectives: masked LM + next-sentence prediction (pre-training) and sequence classification
(fine-tuning); `BertObjective` sends each batch to the one its keys call for."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtrain.models.objective import MetricSums, local_loss


class MaskedLMWithNSP:
    """BERT pre-training: masked-LM cross-entropy over the chosen positions (mlm_labels != -100) plus
    next-sentence-prediction cross-entropy over the pairs, summed with equal weight as in the original."""

    def __init__(self) -> None:
        self.sums = MetricSums()

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mlm_logits, nsp_logits, mlm, nsp = self._forward(model, batch)
        self.sums.add(
            mlm_loss=mlm, nsp_loss=nsp, nsp_accuracy=(nsp_logits.argmax(-1) == batch["nsp_labels"]).float().mean()
        )
        return mlm + nsp

    def _forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        labels, nsp_labels = batch["mlm_labels"], batch["nsp_labels"]
        chosen = labels != -100  # (B, T)
        mlm_logits, nsp_logits = model(
            batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], chosen
        )  # (N, V), (B, 2)
        mlm = local_loss(F.cross_entropy(mlm_logits.float(), labels[chosen]))
        nsp = F.cross_entropy(nsp_logits.float(), nsp_labels)
        return mlm_logits, nsp_logits, mlm, nsp

    def scored(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(masked-LM logits of the masked positions (N, V), their labels (N,), the MLM + NSP loss) from one
        forward: what distillation compares with a teacher."""
        mlm_logits, _, mlm, nsp = self._forward(model, batch)
        labels = batch["mlm_labels"]
        return mlm_logits, labels[labels != -100], mlm + nsp

    @staticmethod
    def positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scored (masked) positions of this batch, a bool (B, T) index."""
        return batch["mlm_labels"] != -100

    def pop_metrics(self, training: bool) -> dict[str, torch.Tensor]:
        return self.sums.pop(training)


class SequenceClassification:
    """Cross-entropy of class logits (B, K) against `class_labels` (B,); reports accuracy."""

    def __init__(self) -> None:
        self.sums = MetricSums()

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scored(model, batch)[2]

    def scored(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class logits (B, K), labels (B,), loss): distillation compares the class distributions."""
        labels = batch["class_labels"]
        logits = model(batch["input_ids"], batch.get("token_type_ids"), batch.get("attention_mask"))  # (B, K)
        self.sums.add(accuracy=(logits.argmax(-1) == labels).float().mean())
        return logits, labels, F.cross_entropy(logits.float(), labels)

    def pop_metrics(self, training: bool) -> dict[str, torch.Tensor]:
        return self.sums.pop(training)


class BertObjective:
    """BERT batches carry either pre-training targets (mlm_labels, nsp_labels) or `class_labels` for
    fine-tuning a classifier; each kind goes to its objective."""

    def __init__(self) -> None:
        self.pretrain, self.classify = MaskedLMWithNSP(), SequenceClassification()

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.classify if "class_labels" in batch else self.pretrain)(model, batch)

    def pop_metrics(self, training: bool) -> dict[str, torch.Tensor]:
        return {**self.pretrain.pop_metrics(training), **self.classify.pop_metrics(training)}

    def scored(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distillation scores the masked-LM positions of pre-training batches (see MaskedLMWithNSP.scored),
        the class logits of classifier batches."""
        return (self.classify if "class_labels" in batch else self.pretrain).scored(model, batch)

    positions = staticmethod(MaskedLMWithNSP.positions)
