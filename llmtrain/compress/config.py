"""The `prune:`, `distill:` and `quant:` sections of a recipe: structured pruning (`llmtrain prune`),
knowledge distillation from a frozen teacher (`launchers/distill.py`) and quantisation-aware training
(fake-quantised linears in `launchers/train.py` and `launchers/distill.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DistillConfig:
    # Teacher: an llmtrain checkpoint, run or consolidated directory (a run dir means its latest checkpoint),
    # or a Hugging Face model directory (config.json, imported through llmtrain's HF interop). '' = none.
    teacher: str = ""
    # Weight of the distillation term: loss = alpha * tau^2 * KL(teacher_tau || student_tau) + (1 - alpha) * CE.
    alpha: float = 0.5
    # Softmax temperature tau of both teacher and student in the KL term.
    temperature: float = 2.0
    # Weight of the hidden-state MSE (student block outputs, through a learned projection when widths differ,
    # against the teacher's uniformly mapped block outputs); 0 disables it.
    hidden_weight: float = 0.0
    # Weight of MiniLM-v2 attention-relation transfer (last block's query-query, key-key and value-value
    # self-attention relations, KL teacher || student); 0 disables it.
    attention_weight: float = 0.0
    # Relation heads of the attention transfer (must divide the q/k/v widths of teacher and student).
    relation_heads: int = 4
    # Numeric format of the frozen teacher's weights and forward: fp32 or bf16 (halves its memory).
    teacher_precision: Literal["fp32", "bf16"] = "fp32"
    # Teacher layout: 0 = whole on every rank; 3 = its parameters partitioned over the data-parallel ranks
    # (DeepSpeed ZeRO-3, no rank ever holds it whole), gathered block by block during its forward.
    teacher_zero_stage: int = 0
    # Directory of precomputed top-k teacher logits for every training sample of the run ('' = run the teacher
    # every step). Built once before training when missing; later runs with the same data pay no teacher forward.
    cache_dir: str = ""
    # Teacher log-probs kept per token in the cache (KL over its top-k plus one bucket for all other tokens).
    top_k: int = 64


@dataclass
class PruneConfig:
    # Importance ranking: activation (calibration batches, Minitron) or magnitude (weight norms, no data).
    method: Literal["activation", "magnitude"] = "activation"
    # Target number of transformer blocks (None keeps all); the least important blocks are dropped.
    n_layer: int | None = None
    # Target query heads per block (None keeps all); with grouped-query attention whole kv groups go.
    n_head: int | None = None
    # Target key/value heads per block (grouped-query attention); None follows n_head.
    n_kv_head: int | None = None
    # Target MLP hidden width (None keeps it).
    intermediate_size: int | None = None
    # Target hidden width (None keeps it).
    n_embd: int | None = None
    # Target experts per mixture-of-experts block (model.moe; None keeps all): the least used ones go (router
    # top-k assignments over the calibration batches; method=magnitude: router-row x expert weight norms).
    # Only on its own (no other target): the rest of an MoE model is not pruned.
    experts: int | None = None
    # Calibration micro-batches from the checkpoint's training data (method=activation).
    calib_batches: int = 16
    # Held-out micro-batches for the perplexity printed before and after pruning.
    eval_batches: int = 16
    # Sequences per calibration / eval micro-batch.
    micro_batch_size: int = 8
    # Tokens per calibration / eval sequence (None: the checkpoint's train.seq_len).
    seq_len: int | None = None


# The built-in quantize.method values and their `llmtrain quantize --help` lines, torch-free so that building the
# parser imports no torch; llmtrain/compress/quant/ptq.py registers each (`register_method` adds more).
QUANTIZE_METHODS = {
    "rtn": "round to nearest on the grid (no data)",
    "gptq": "GPTQ: Hessian-weighted error compensation, calibrated",
    "from-qat": "a quantisation-aware training run's own grid (its quant: section; --bits/--group-size/--grid ignored)",
}


@dataclass
class QuantizeConfig:
    # Bits per weight of every linear layer: 8 (int8, symmetric) or 4 (two per byte, asymmetric).
    bits: int = 8
    # rtn (round to nearest, no data) or a calibrated method (gptq); `llmtrain quantize --help` lists them all.
    method: str = "rtn"
    # Input columns sharing one scale (must divide every linear layer's input width); 0 = one per output row.
    group_size: int = 128
    # Grid: auto (symmetric for 8 bits, asymmetric with zero points for 4), sym or asym.
    grid: Literal["auto", "sym", "asym"] = "auto"
    # Calibration micro-batches of the checkpoint's training data (calibrated methods).
    calib_batches: int = 16
    # Held-out micro-batches for the perplexity printed before and after quantisation.
    eval_batches: int = 16
    # Sequences per calibration / eval micro-batch.
    micro_batch_size: int = 4
    # Tokens per calibration / eval sequence (0: the checkpoint's train.seq_len, capped at its block_size).
    seq_len: int = 0
    # Calibration / eval data: '' = the checkpoint's own data section, else a prepared dataset or 'bundled'.
    data: str = ""
    # Storage of the tensors left in float (embeddings, norms, biases, a tied output head): fp32, bf16 or fp16.
    float_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


@dataclass
class QuantConfig:
    # Quantisation-aware training: integer bits of the student's linear weights (4 or 8), fake-quantised in
    # the forward with a straight-through backward (llmtrain/compress/quant/qat.py); None = off, no change.
    bits: int | None = None
    # Input columns per scale (and zero point) of each output row; 0 = one group per row. Must divide every
    # quantised linear's input width, under parallel.tp the per-rank width of row-parallel linears too.
    group_size: int = 128
    # Symmetric grid (zero point 0); None = symmetric for 8 bits, asymmetric for 4 (llmtrain/compress/quant/grid.py).
    symmetric: bool | None = None
    # Fake quantisation: rtn = round-to-nearest on the grid of each group's current min/max (or max|w|),
    # recomputed every forward; `llmtrain quantize --method from-qat` exports exactly that grid.
    method: str = "rtn"
    # First optimizer step (0-based) that runs fake-quantised; earlier steps train in full precision.
    start_step: int = 0
