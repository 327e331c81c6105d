"""The frozen teacher: a whole module on every rank, or a ZeRO-3 inference engine from the DeepSpeed door."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmtrain.config import ConfigError
from llmtrain.errors import CheckpointError, UserError
from llmtrain.models.registry import family_of

if TYPE_CHECKING:
    from llmtrain.models.config import ModelConfig


def load_teacher(
    path: str | Path, precision: str, device: torch.device, zero_stage: int = 0, overrides: dict[str, Any] | None = None
) -> tuple[nn.Module, Any]:
    """A frozen, eval-mode module of the teacher: an llmtrain checkpoint, run or consolidated directory, or a
    Hugging Face directory / GGUF file, imported on the fly through llmtrain's HF interop. zero_stage=3
    (collective: every rank calls it) returns a ZeRO-3 inference engine around it instead of a whole module."""
    import tempfile

    from llmtrain.models.converters import build_converted_model
    from llmtrain.parallel.consolidate import iter_model_weights, load_model_weights

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    try:
        with tempfile.TemporaryDirectory(prefix="llmtrain-teacher-") as tmp:
            if (Path(path) / "config.json").is_file() or Path(path).suffix == ".gguf":
                from llmtrain.interop.hf import import_hf

                path = import_hf(path, Path(tmp) / "teacher")
            if zero_stage == 3:
                cfg, weights = iter_model_weights(path)
                return _zero3_teacher(path, cfg, weights, dtype, overrides), cfg
            cfg, state = load_model_weights(path)
    except UserError as exc:
        raise CheckpointError(f"distill.teacher: {exc}") from None
    teacher = build_converted_model(cfg)  # with the checkpoint's converters: their weights are in `state`
    teacher.load_state_dict(state)
    return teacher.to(device=device, dtype=dtype).eval().requires_grad_(False), cfg


def _zero3_teacher(
    path: str | Path,
    cfg: ModelConfig,
    weights: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """The teacher in an optimizer-less ZeRO-3 engine from the DeepSpeed door (`engine.zero3_inference_engine`):
    built partitioned (each rank allocates only its part of every parameter), the checkpoint copied in one
    parameter at a time (gathered, written by rank 0, re-partitioned); its hooks gather each module's
    parameters for its forward. `overrides` are parallel.deepspeed_overrides."""

    from llmtrain.models.converters import build_converted_model
    from llmtrain.parallel.ds_compat import zero3_full_shape, zero3_numel, zero3_partition_dtype
    from llmtrain.parallel.engine import zero3_inference_engine
    from llmtrain.utils import rank

    def fill(teacher: nn.Module, gathered: Any) -> None:
        params = dict(teacher.named_parameters())  # tied weights once, as the checkpoint yields them
        seen = set()
        with torch.no_grad():
            for name, tensor in weights:
                p = params.get(name)
                if p is None or zero3_full_shape(p) != tuple(tensor.shape):
                    raise CheckpointError(
                        f"{path}: parameter '{name}' {tuple(tensor.shape)} does not fit the "
                        f"teacher built from its own config; the checkpoint is inconsistent"
                    )
                with gathered([p]):
                    if rank() == 0:
                        p.data.copy_(tensor)
                seen.add(name)
        missing = [n for n in params if n not in seen]
        if missing:
            raise CheckpointError(f"{path} has no weight for '{missing[0]}'; it is incomplete")

    engine = zero3_inference_engine(lambda: build_converted_model(cfg), fill, dtype, overrides)
    teacher = engine.module
    local, total = (sum(n) for n in zip(*(zero3_numel(p) for p in teacher.parameters())))
    kind = zero3_partition_dtype(next(teacher.parameters()))
    print(f"teacher ZeRO-3: rank {rank()} holds {local} of {total} teacher parameter elements ({kind})", flush=True)
    return engine


def check_pair(student: ModelConfig, teacher: ModelConfig) -> None:
    """Student and teacher model configs share the family and the vocabulary."""
    s_family, t_family = family_of(student).name, family_of(teacher).name
    if student.vocab_size != teacher.vocab_size or s_family != t_family:
        raise ConfigError(
            f"student and teacher must share the tokenizer and family: student model.arch="
            f"{s_family} vocab_size={student.vocab_size}, teacher arch={t_family} vocab_size="
            f"{teacher.vocab_size}; set model.vocab_size={teacher.vocab_size} (and the same data.tokenizer)"
        )
