"""Post-training weight-only quantisation: the library behind `llmtrain quantize`.

    quantize_model(model, weight_quant, "gptq", calib_batches, forward)   # in place: QuantLinear layers

Methods (the table `METHODS`; another module may add one with `register_method`, e.g. `from-qat`):
- `rtn`: round to nearest on the grid (grid.py), no data;
- `gptq`: GPTQ (gptq.py), calibrated on batches of the run's own training data: each column's rounding
  error is compensated on the columns not yet quantised, weighted by the layer's input Hessian. Chosen
  over AWQ as the calibrated method because it is grid-agnostic (it uses our group-wise scales as they
  are) and needs nothing beyond the inputs of each layer.

Every linear layer is quantised except those tied to an embedding (the output head of a tied model);
embeddings, norms and biases stay float (the output head of GPTQ's and llama.cpp's recipes too).

`run_quantize` reads any checkpoint `llmtrain eval` reads, quantises it, measures held-out perplexity
(decoders; BERT: its MLM + NSP loss) before and after on the checkpoint's validation data, and writes a
model directory (model_dir.py): packed integers + scales in model.safetensors, the run config with
`model.converters: [quantized_weights]` and `model.weight_quant`, `quantize.json` with the figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmtrain.compress.config import QUANTIZE_METHODS
from llmtrain.compress.quant.grid import QuantSpec, check_spec, group_params, quantize
from llmtrain.compress.quant.linear import CONVERTER, QuantLinear, quantizable_linears, replace_module, spec_of
from llmtrain.compress.quant.qat import from_qat_settings
from llmtrain.errors import UserError

if TYPE_CHECKING:
    from llmtrain.compress.config import QuantizeConfig
    from llmtrain.models.config import ModelConfig, WeightQuant

Batch = dict[str, torch.Tensor]
Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q (out, in) integers, scale, zero (out, groups)
# (model, {name: linear}, spec, calibration batches or None, forward(model, batch)) -> {name: Quantized}
MethodFn = Callable[[nn.Module, dict[str, nn.Linear], QuantSpec, "list[Batch] | None", Callable], dict[str, Quantized]]


@dataclass(frozen=True)
class Method:
    fn: MethodFn
    calibrated: bool  # needs calibration batches
    help: str
    # (checkpoint, args) -> args: a method whose settings come from the checkpoint (from-qat: its quant: section)
    settings: Callable[[str | Path, QuantizeConfig], QuantizeConfig] | None = None


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    fn: MethodFn,
    calibrated: bool,
    help: str,
    settings: Callable[[str | Path, QuantizeConfig], QuantizeConfig] | None = None,
) -> None:
    """Add a method to `llmtrain quantize --method`; a second, different one under a taken name is an error."""
    if name in METHODS and (METHODS[name].fn is not fn or METHODS[name].settings is not settings):
        raise ValueError(f"a quantisation method named {name!r} is already registered")
    METHODS[name] = Method(fn, calibrated, help, settings)


def _progress(items: Iterable[Any], desc: str, total: int | None = None) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit="layer" if desc.startswith("quant") else "batch", disable=None)


def rtn(
    model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec, calib: Any, forward: Any
) -> dict[str, Quantized]:
    out = {}
    for name, lin in _progress(linears.items(), "quantize (rtn)", len(linears)):
        scale, zero = group_params(lin.weight, spec)
        out[name] = (quantize(lin.weight, scale, zero, spec), scale, zero)
    return out


def gptq(
    model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec, calib: list[Batch] | None, forward: Callable
) -> dict[str, Quantized]:
    from llmtrain.compress.quant.gptq import HessianCollector, gptq_quantize

    assert calib, "gptq needs calibration batches"
    collector = HessianCollector(linears)
    try:
        with torch.no_grad():
            for batch in _progress(calib, "calibration"):
                forward(model, batch)
    finally:
        collector.remove()
    out = {}
    for name, lin in _progress(linears.items(), "quantize (gptq)", len(linears)):
        out[name] = gptq_quantize(lin.weight, collector.h.pop(name), spec)
    return out


register_method("rtn", rtn, calibrated=False, help=QUANTIZE_METHODS["rtn"])
register_method("gptq", gptq, calibrated=True, help=QUANTIZE_METHODS["gptq"])
# Quantisation-aware training's export: round to nearest on the grid of the run's quant: section, exactly the
# fake quantisation it trained with (qat.py), so the packed model computes the QAT model's logits.
register_method(
    "from-qat",
    rtn,
    calibrated=False,
    help=QUANTIZE_METHODS["from-qat"],
    settings=from_qat_settings,
)


def quantize_model(
    model: nn.Module,
    wq: WeightQuant,
    method: str,
    calib: list[Batch] | None = None,
    forward: Callable[[nn.Module, Batch], Any] | None = None,
) -> list[str]:
    """Replace `model`'s quantizable linears (all but tied heads and `wq.skip`) by QuantLinear layers holding
    `method`'s integers, in place; returns their names. UserError for a bad spec or unknown method."""
    spec = spec_of(wq)
    if method not in METHODS:
        raise UserError(f"--method {method}: unknown; choose one of {', '.join(sorted(METHODS))}")
    linears = quantizable_linears(model, wq.skip)
    for name, lin in linears.items():
        check_spec(spec, lin.in_features, f"--group-size (layer {name})")
    if METHODS[method].calibrated and not calib:
        raise UserError(f"--method {method} is calibrated: give --calib-batches >= 1")
    result = METHODS[method].fn(model, linears, spec, calib, forward or _family_forward)
    for name, lin in linears.items():
        new = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, spec, device=lin.weight.device)
        new.set_quantized(*result.pop(name))
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().float().clone())
        replace_module(model, name, new)
    return list(linears)


def _family_forward(model: nn.Module, batch: Batch) -> Any:
    from llmtrain.models.registry import family_of

    return family_of(model.cfg).forward_inputs(model, batch)


# ---------------------------------------------------------------------------------------------
# `llmtrain quantize`


GRIDS: dict[str, bool | None] = {"auto": None, "sym": True, "asym": False}
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def tensor_bytes(model: nn.Module, float_dtype: torch.dtype = torch.float32) -> int:
    """Bytes the model directory's tensors take: parameters (tied once) at float_dtype, persistent buffers as they are."""
    from llmtrain.model_dir import model_tensors

    return sum(t.numel() * t.element_size() for t in model_tensors(model, float_dtype).values())


def weight_count(model: nn.Module) -> int:
    """Parameters of the model as a float model counts them (a QuantLinear's weight included), tied once."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))


def run_quantize(
    checkpoint: str | Path, args: QuantizeConfig, out: str | Path, replace: bool = False
) -> dict[str, Any]:
    """Quantise the model at `checkpoint` into the model directory `out`; returns the figures printed."""
    from llmtrain.compress.prune_checkpoint import source_config
    from llmtrain.config import save_config
    from llmtrain.model_dir import CONFIG, check_output, model_tensors, write_weights, writing
    from llmtrain.models.config import WeightQuant
    from llmtrain.models.converters import build_converted_model
    from llmtrain.parallel.consolidate import load_model_weights

    if args.bits not in (4, 8):
        raise UserError(f"--bits {args.bits} is not supported; use 8 or 4")
    if args.method not in METHODS:
        raise UserError(f"--method {args.method}: unknown; choose one of {', '.join(sorted(METHODS))}")
    if (settings := METHODS[args.method].settings) is not None:
        args = settings(checkpoint, args)
    if args.float_dtype not in FLOAT_DTYPES:
        raise UserError(f"--float-dtype {args.float_dtype}: choose one of {', '.join(FLOAT_DTYPES)}")
    if args.grid not in GRIDS:
        raise UserError(f"--grid {args.grid}: choose one of {', '.join(GRIDS)}")
    wq = WeightQuant(bits=args.bits, group_size=args.group_size, symmetric=GRIDS[args.grid])
    spec_of(wq)  # bad bits / group size: one line before any slow work
    if args.group_size < 0 or args.eval_batches < 1 or args.micro_batch_size < 1 or args.seq_len < 0:
        raise UserError("--group-size and --seq-len must be >= 0, --eval-batches and --micro-batch-size >= 1")
    check_output(out, replace)
    model_cfg, weights = load_model_weights(checkpoint)
    if model_cfg.converters:
        raise UserError(
            f"{checkpoint}: quantize reads plain models, and this one was converted (model.converters="
            f"{model_cfg.converters}); quantise its unconverted source"
        )
    model_cfg = dataclasses.replace(model_cfg, init_from=None)
    model = build_converted_model(model_cfg)
    model.load_state_dict(weights)
    del weights
    model.eval()
    for name, lin in quantizable_linears(model, wq.skip).items():
        check_spec(spec_of(wq), lin.in_features, f"--group-size (layer {name})")

    cfg = source_config(checkpoint, model_cfg)
    data, val, calib, forward, measure = _data_for(checkpoint, cfg, model_cfg, args)
    fdtype = FLOAT_DTYPES[args.float_dtype]
    params, bytes_before = weight_count(model), tensor_bytes(model)
    t0 = time.time()
    loss_before = measure(model, val)
    t_eval = time.time() - t0
    t0 = time.time()
    names = quantize_model(model, wq, args.method, calib, forward)
    t_quant = time.time() - t0
    loss_after = measure(model, val)
    new_cfg = dataclasses.replace(model_cfg, converters=[CONVERTER], weight_quant=wq)
    figures = {
        "source": str(checkpoint),
        "bits": args.bits,
        "method": args.method,
        "group_size": args.group_size,
        "symmetric": spec_of(wq).sym,
        "float_dtype": args.float_dtype,
        "calib_batches": args.calib_batches if METHODS[args.method].calibrated else 0,
        "quantized_layers": len(names),
        "params": params,
        "bytes_before": bytes_before,
        "bytes_after": tensor_bytes(model, fdtype),
        "metric": "perplexity" if data["generative"] else "loss (MLM + NSP)",
        "loss_before": loss_before,
        "loss_after": loss_after,
        "ppl_before": math.exp(loss_before),
        "ppl_after": math.exp(loss_after),
        "eval_tokens": data["tokens"],
        "seconds_quantize": round(t_quant, 2),
        "seconds_eval": round(t_eval, 2),
    }
    # out_dir: not the source run's, so a `train` of this config.yaml can never resume over the source
    out = Path(out)
    run_cfg = dataclasses.replace(cfg, model=new_cfg, out_dir=str(out.with_name(out.name + "_train")))
    with writing(out, replace) as tmp:
        write_weights(tmp, model_tensors(model, fdtype), metadata={"quantized": f"{args.method} int{args.bits}"})
        save_config(run_cfg, tmp / CONFIG)
        (tmp / "quantize.json").write_text(json.dumps(figures, indent=1))
        tokenizer = _tokenizer_dir(checkpoint)
        if tokenizer is not None:  # an imported model's own tokenizer goes along (eval and generate read it)
            shutil.copytree(tokenizer, tmp / tokenizer.name)
    return figures


def _tokenizer_dir(checkpoint: str | Path) -> Path | None:
    from llmtrain.inference import TOKENIZER_DIR, _checkpoint_dir

    for d in (Path(checkpoint) / TOKENIZER_DIR, _checkpoint_dir(checkpoint) / TOKENIZER_DIR):
        if d.is_dir():
            return d
    return None


def _data_for(checkpoint: str | Path, cfg: Any, model_cfg: ModelConfig, args: QuantizeConfig) -> tuple[Any, ...]:
    """(info, validation batches, calibration batches or None, forward, measure(model, batches) -> loss)."""
    from llmtrain.data import build_data
    from llmtrain.inference import checkpoint_tokenizer, eval_data_config, perplexity_on
    from llmtrain.models.registry import family_of

    family = family_of(model_cfg)
    data_cfg = eval_data_config(checkpoint, args.data) if args.data else cfg.data
    seq_len = min(args.seq_len or cfg.train.seq_len, model_cfg.block_size)
    run_data = build_data(
        data_cfg,
        seq_len=seq_len,
        seed=cfg.train.seed,
        micro_batch_size=args.micro_batch_size,
        grad_accum=1,
        dp_rank=0,
        dp_size=1,
    )
    if run_data.vocab_size > model_cfg.vocab_size:
        raise UserError(
            f"{checkpoint}: the data's tokenizer has {run_data.vocab_size} tokens but the model only "
            f"{model_cfg.vocab_size}; pass --data prepared with the model's tokenizer"
        )
    try:
        expected = checkpoint_tokenizer(checkpoint).hash
    except UserError:
        expected = None
    if expected is not None and run_data.tokenizer.hash != expected:
        raise UserError(
            f"{checkpoint}: its data ({data_cfg.path}) was tokenized with another tokenizer than the model's; "
            f"pass --data DIR prepared with the model's tokenizer (llmtrain prepare-data --tokenizer ...)"
        )
    val = run_data.val_batches(args.eval_batches)
    calib = None
    if METHODS[args.method].calibrated:
        if args.calib_batches < 1:
            raise UserError(f"--method {args.method} is calibrated: give --calib-batches >= 1")
        calib = [run_data.train_batches(s)[0] for s in range(args.calib_batches)]

    def forward(model: nn.Module, batch: Batch) -> Any:
        return family.forward_inputs(model, batch)

    if family.generative:

        def measure(model: nn.Module, batches: list[Batch]) -> float:
            return perplexity_on(model, batches, "cpu")[0]

    else:
        from llmtrain.compress.prune_checkpoint import held_out_loss
        from llmtrain.train.objectives import objective_for

        objective = objective_for(model_cfg)

        def measure(model: nn.Module, batches: list[Batch]) -> float:
            return held_out_loss(model, objective, batches)

    tokens = sum(int((b["labels"] != -100).sum()) for b in val if "labels" in b)
    return {"generative": family.generative, "tokens": tokens}, val, calib, forward, measure
