"""Quantisation-aware training (QAT) and distillation (QAD): the student's linears fake-quantised in the forward.

    y = x @ fake_quantize(W)^T + b      forward: W rounded onto its own group-wise integer grid (grid.py)
    dL/dW = dL/d fake_quantize(W)       backward: straight-through (the rounding is treated as the identity)

The `quant:` section turns it on (`quant.bits` 4 or 8; unset = off and nothing changes). The trainer applies
`fake_quant` through the model-converter hook (llmtrain/models/converters.py) after `model.init_from` and
`model.converters`, before any parallelism, in `launchers/train.py` and `launchers/distill.py` alike (QAD: the
teacher is loaded separately and stays in full precision; a teacher-logit cache and the ZeRO-3 teacher are
unaffected). The quantised linears are those `llmtrain quantize` quantises (`quant_targets`: every
`nn.Linear` but an output head tied to the embedding); embeddings, norms and biases stay in full precision.

The master weights stay full precision and so does every checkpoint: fake quantisation adds no parameter and
no state, and a QAT checkpoint loads anywhere a plain one does (its readers see the unquantised weights).
`llmtrain quantize --method from-qat` reads the run's `quant:` section and quantises each target with exactly
this grid, so the packed model computes the fake-quantised model's logits.

`quant.start_step`: steps before it train in full precision (a short full-precision phase, then QAT). The state
is a function of the step (`QATState.at_step`, a step hook the trainer calls before every optimizer step), so
resuming restores it with nothing saved.

Tensor parallel: a sharded linear (`ColumnParallelLinear`, `RowParallelLinear`) keeps the converted linear's
`weight_transform` and applies it to its local shard. Scales are per output row and group of input columns:
column-parallel shards hold whole rows, row-parallel shards hold `in / tp` columns of every row, so the local
scales are exactly the whole weight's when `quant.group_size` divides `in / tp` (checked at config load;
`group_size=0`, one scale per row, is refused with tp > 1).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.compress.quant.grid import QuantSpec, check_spec, fake_quantize
from llmtrain.errors import ConfigError, UserError

if TYPE_CHECKING:
    from llmtrain.compress.config import QuantConfig, QuantizeConfig
    from llmtrain.models.config import ModelConfig

QAT_METHODS = ("rtn",)  # fake quantisation on the round-to-nearest grid of the current weights
CONVERTER = "llmtrain.compress.quant.qat:fake_quant"  # the name the trainer applies it by (converters.py)


def spec_of(quant: QuantConfig) -> QuantSpec:
    """The grid of a `quant:` section (bits must be set)."""
    assert quant.bits is not None
    return QuantSpec(quant.bits, quant.group_size, quant.symmetric)


def quant_targets(model: nn.Module) -> list[str]:
    """Names of the linears QAT fake-quantises: those `llmtrain quantize` packs (linear.py's
    `quantizable_linears`: every nn.Linear but one tied to an embedding), so from-qat packs the same set."""
    from llmtrain.compress.quant.linear import quantizable_linears

    return list(quantizable_linears(model))


class QATState:
    """Shared by a model's fake-quantised linears: whether this step runs quantised."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.active = False

    def at_step(self, step: int) -> None:
        self.active = step >= self.start_step


class FakeQuant:
    """The weight transform of a fake-quantised linear: w -> fake_quantize(w) while the state is active.
    A plain callable (not a module), so a tensor-parallel layer can keep it without the old linear."""

    def __init__(self, spec: QuantSpec, state: QATState):
        self.spec, self.state = spec, state

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.spec) if self.state.active else weight


class FakeQuantLinear(nn.Linear):
    """An nn.Linear whose forward uses `weight_transform(weight)`; parameters and names are nn.Linear's."""

    weight_transform: FakeQuant

    @classmethod
    def from_linear(cls, linear: nn.Linear, transform: FakeQuant) -> FakeQuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        new.weight_transform = transform
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_transform(self.weight), self.bias)

    def extra_repr(self) -> str:
        s = self.weight_transform.spec
        return f"{super().extra_repr()}, fake int{s.bits} group_size={s.group_size} symmetric={s.sym}"


def fake_quant(quant: QuantConfig) -> Callable[[nn.Module], None]:
    """Converter factory (llmtrain/models/converters.py): fake-quantise `quant_targets(model)` in place, off
    until the trainer's step hook reaches `quant.start_step`."""
    spec = spec_of(quant)

    def convert(model: nn.Module) -> None:
        from llmtrain.models.converters import add_step_hook

        state = QATState(quant.start_step)
        transform = FakeQuant(spec, state)
        for name in quant_targets(model):
            parent, _, child = name.rpartition(".")
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            setattr(model.get_submodule(parent), child, FakeQuantLinear.from_linear(linear, transform))
        add_step_hook(model, state.at_step)

    return convert


def qat_state(model: nn.Module) -> QATState | None:
    """The QATState of a fake-quantised model (None for a plain one)."""
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            return m.weight_transform.state
    return None


def check_quant(quant: QuantConfig, model_cfg: ModelConfig, tp: int) -> None:
    """ConfigError (one line, naming the key and the fix) for a `quant:` section that cannot train this model."""
    if quant.method not in QAT_METHODS:
        raise ConfigError(
            f"quant.method={quant.method!r} cannot be trained against; quantisation-aware training fake-quantises "
            f"with {', '.join(QAT_METHODS)} (calibrated methods are post-training: llmtrain quantize --method)"
        )
    if quant.start_step < 0:
        raise ConfigError(f"quant.start_step must be >= 0 (0 = quantised from the first step); got {quant.start_step}")
    spec = spec_of(quant)
    try:
        check_spec(spec, what="quant")
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    from llmtrain.models.registry import family_of

    with torch.device("meta"):
        model = family_of(model_cfg).build(model_cfg)
    row = [p for p, style in family_of(model_cfg).tp_plan(model).items() if style == "row"] if tp > 1 else []
    for name in quant_targets(model):
        width = int(cast(nn.Linear, model.get_submodule(name)).in_features)
        try:
            check_spec(spec, width, what="quant")
        except UserError as exc:
            raise ConfigError(f"{exc} ({name})") from None
        if any(fnmatch.fnmatchcase(name, p) for p in row):
            _check_row_parallel(spec, name, width, tp)


def _check_row_parallel(spec: QuantSpec, name: str, width: int, tp: int) -> None:
    """A row-parallel shard holds width / tp input columns of every row: its groups must be whole ones."""
    local = width // tp
    if spec.group_size == 0:
        raise ConfigError(
            f"quant.group_size=0 (one scale per row) with parallel.tp={tp}: the row-parallel {name} holds "
            f"{local} of each row's {width} inputs per rank, so its scales would not be the whole row's; set "
            f"quant.group_size to a divisor of {local}"
        )
    if local % spec.group_size:
        raise ConfigError(
            f"quant.group_size={spec.group_size} does not divide the per-rank input width {local} of the "
            f"row-parallel {name} ({width} / parallel.tp={tp}), so a group would straddle two ranks; pick a "
            f"divisor of {local} (e.g. {min(local & -local, 128)}) or a smaller parallel.tp"
        )


def from_qat_settings(checkpoint: str | Path, args: QuantizeConfig) -> QuantizeConfig:
    """`llmtrain quantize --method from-qat`: `args` with the bits, group size and grid of the checkpoint's
    `quant:` section (its config.yaml), the grid its fake quantisation trained against."""
    from llmtrain.config import load_config
    from llmtrain.parallel.checkpoint_paths import resolve_checkpoint

    path = Path(checkpoint)
    config_file = path / "config.yaml" if (path / "config.yaml").is_file() else resolve_checkpoint(path) / "config.yaml"
    quant = load_config(config_file).quant
    if quant.bits is None:
        raise UserError(
            f"--method from-qat: {checkpoint} was not trained with quantisation-aware training (no quant.bits in "
            f"{config_file}); use --method rtn or gptq, or train with quant.bits=4|8"
        )
    grid: Literal["auto", "sym", "asym"] = "auto" if quant.symmetric is None else "sym" if quant.symmetric else "asym"
    return dataclasses.replace(args, bits=quant.bits, group_size=quant.group_size, grid=grid)
