"""The `dpo:` section of a recipe: preference tuning with `train.objective=dpo` (llmtrain/finetune/dpo.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DPOConfig:
    # Strength of the implicit KL penalty: loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).
    beta: float = 0.1
    # The frozen reference model: an llmtrain checkpoint, run or model directory, a Hugging Face directory or a
    # .gguf file. '' = the policy's starting weights (model.init_from).
    reference: str = ""
    # Numeric format of the reference's weights and forward: fp32 or bf16 (halves its memory).
    reference_precision: Literal["fp32", "bf16"] = "fp32"
    # Reference layout: 0 = whole on every rank; 3 = its parameters partitioned over the data-parallel ranks
    # (an optimizer-less DeepSpeed ZeRO-3 engine), gathered block by block during its forward.
    reference_zero_stage: int = 0
    # Directory of the reference's sequence log-probs of every training and held-out pair of the run ('' = run
    # the reference every step). Built once (rank 0) when missing; then no reference is loaded at all.
    cache_dir: str = ""
