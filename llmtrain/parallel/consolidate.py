"""Model weights out of any checkpoint, whatever layout saved it, one parameter at a time.

Every checkpoint holds `<ckpt>/universal/<plain name>.safetensors` (see universal.py): the whole fp32
weight of one parameter of the plain model, whatever tp, pp, dp or ZeRO stage wrote it. This module
reads those files with the checkpoint's `config.yaml`:

    cfg, weights = load_model_weights("runs/x")      # run dir, checkpoints/ dir, step dir or consolidated dir
    model = build_model(cfg); model.load_state_dict(weights)

`consolidate` writes them as a model directory (llmtrain/model_dir.py), streaming: the header is built
from the shapes alone, then each parameter is read, written and dropped, so at most one parameter is in
memory. A consolidated directory is itself accepted by `load_model_weights` and `model.init_from`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
import yaml

from llmtrain.errors import CheckpointError
from llmtrain.model_dir import (
    CONFIG,
    WEIGHTS,
    check_output,
    model_config_yaml,
    stream_weights,
    write_config_text,
    write_weights,
    writing,
)
from llmtrain.models import ModelConfig
from llmtrain.models.config import model_config_from_dict
from llmtrain.models.converters import build_converted_model

CONSOLIDATED, CONFIG = WEIGHTS, CONFIG  # the model directory's file names
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_model_weights(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, state dict of fp32 CPU tensors by plain-model name) of the checkpoint at `path`.

    `path` is a run directory (its `checkpoints/latest`), a `checkpoints/` folder, one `step_*` folder or a
    directory written by `consolidate`. Tied weights appear under every name of the state dict, as one
    tensor. Raises ValueError for a missing or incomplete checkpoint."""
    cfg, source = _open(path)
    return cfg, _tied_state_dict(cfg, dict(_tensors(source, cfg)))


def iter_model_weights(path: str | Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """Like load_model_weights, but yields (name, tensor) one parameter at a time (each tied tensor once)."""
    cfg, source = _open(path)
    return cfg, _tensors(source, cfg)


def init_model_from(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Copy the weights of the checkpoint at `path` into `model` (plain, not yet parallelised), one
    parameter at a time. Raises ValueError naming the first parameter whose name or shape differs.

    A model whose vocabulary is larger than the checkpoint's (model.vocab_size padded, e.g. to a multiple
    of parallel.tp or of 64) takes the checkpoint's rows of each vocabulary table (embedding, output head
    and its bias) and keeps its fresh init in the rows beyond; no tokenizer ever produces those ids.
    Returns the names of the tables so padded."""
    try:
        ckpt_cfg, weights = iter_model_weights(path)
    except ValueError as exc:
        raise CheckpointError(f"model.init_from: {exc}") from None
    if ckpt_cfg.converters:  # init_from runs before the converters (llmtrain/models/converters.py)
        weights = _unconverted(path, ckpt_cfg, weights)
    params = dict(model.named_parameters())
    # Fine-tuning: a model with a task head (e.g. a classifier) keeps that head's fresh init and takes
    # only the pre-trained trunk; the checkpoint's own heads (masked LM, ...) are left out.
    head = tuple(getattr(model, "task_head_prefixes", ()))
    model_cfg = cast(ModelConfig, model.cfg)
    vocab, ckpt_vocab = model_cfg.vocab_size, ckpt_cfg.vocab_size
    seen, padded = set(), []
    with torch.no_grad():
        for name, tensor in weights:
            if name not in params and head:
                continue
            if name not in params:
                raise CheckpointError(
                    f"model.init_from={path}: the checkpoint has parameter '{name}' that this "
                    f"model does not; set the model.* keys to the checkpoint's shape"
                )
            target = params[name]
            if (
                target.shape != tensor.shape
                and ckpt_vocab < vocab
                and tensor.shape[:1] == (ckpt_vocab,)
                and target.shape == (vocab, *tensor.shape[1:])
            ):
                target[:ckpt_vocab].copy_(tensor)  # a vocabulary table, padded: the rest keeps its init
                padded.append(name)
            elif target.shape != tensor.shape:
                raise CheckpointError(
                    f"model.init_from={path}: parameter '{name}' has shape {tuple(tensor.shape)} "
                    f"in the checkpoint but {tuple(target.shape)} in this model; set the "
                    f"model.* keys to the checkpoint's shape"
                )
            else:
                target.copy_(tensor)
            seen.add(name)
    missing = [n for n in params if n not in seen and not n.startswith(head)]
    if missing:
        raise CheckpointError(
            f"model.init_from={path}: the checkpoint has no '{missing[0]}' ({len(missing)} "
            f"parameters missing); set the model.* keys to the checkpoint's shape"
        )
    # Where the weights came from: a checkpoint of this model whose base stays frozen (LoRA) points at it
    # instead of storing it (universal.py).
    setattr(model, "llmtrain_init_from", str(path))
    return padded


def _unconverted(
    path: str | Path, cfg: ModelConfig, weights: Iterator[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain model's weights of a converted checkpoint whose converters can be undone (quantised
    linears: dequantised); CheckpointError otherwise."""
    from llmtrain.models.converters import unconvert

    with torch.device("meta"):
        model = build_converted_model(cfg)
    state = _tied_state_dict(cfg, dict(weights))
    model.load_state_dict(state, assign=True)
    if not unconvert(model, cfg):
        raise CheckpointError(
            f"model.init_from={path}: that model was converted (model.converters="
            f"{cfg.converters}) and init_from loads a plain model's weights before this run's "
            f"converters are applied; initialise from its unconverted source, or resume the run"
        )
    with torch.device("meta"):  # each tied parameter once, under its first name (as the plain model lists it)
        names = [n for n, _ in build_converted_model(_plain_config(cfg)).named_parameters()]
    params = dict(model.named_parameters(remove_duplicate=False))
    return iter([(n, params[n].detach().float()) for n in names])


def consolidate(
    path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32, replace: bool = False
) -> Path:
    """Write the model directory `out_dir` (llmtrain/model_dir.py: model.safetensors with every parameter
    once by plain name, config.yaml, checksums.json); returns the safetensors path. Holds one parameter in
    memory at a time. A non-empty `out_dir` is refused unless `replace`."""
    from tqdm import tqdm

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(str(d) for d in _DTYPES)}; got {dtype}")
    check_output(out_dir, replace)
    cfg, source = _open(path)
    shapes = _shapes(source, cfg)
    tensors = tqdm(_tensors(source, cfg), total=len(shapes), unit="param", desc="consolidate", disable=None)
    with writing(out_dir, replace) as tmp:
        if source.name != CONSOLIDATED and _has_buffers(cfg):  # integer buffers (QLoRA's base) keep their dtype
            write_weights(
                tmp, {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors}, {"source": str(source)}
            )
        else:
            stream_weights(tmp, shapes, tensors, dtype, metadata={"source": str(source)})
        write_config_text(tmp, _config_text(cfg, source))
    return Path(out_dir) / CONSOLIDATED


# ---------------------------------------------------------------------------------------------


def _open(path: str | Path) -> tuple[ModelConfig, Path]:
    """(model config, source): source is a consolidated model.safetensors or a checkpoint's universal/ folder."""
    from llmtrain.integrity import verify_dir

    path = Path(path)
    if (path / "config.json").is_file() and not (path / CONFIG).is_file():
        raise CheckpointError(
            f"{path} is a Hugging Face transformers model directory (config.json, no "
            f"config.yaml); convert it first: `llmtrain import-hf {path} OUT`, then pass OUT"
        )
    if (path / CONSOLIDATED).is_file():
        verify_dir(
            path,
            only=[CONSOLIDATED, CONFIG],
            fix=f"write {path} again (llmtrain consolidate, prune or import-hf) or restore it from a copy",
        )
        return _model_config(path / CONFIG), path / CONSOLIDATED
    from llmtrain.parallel.checkpoint_paths import resolve_checkpoint
    from llmtrain.parallel.universal import FOLDER

    ckpt = resolve_checkpoint(path)
    verify_dir(
        ckpt,
        only=[f"{FOLDER}/", CONFIG],
        fix=f"use an older checkpoint under {ckpt.parent} or restore {ckpt.name} from a copy",
    )
    if not (ckpt / FOLDER / "meta.json").is_file():
        raise CheckpointError(
            f"{ckpt} has no {FOLDER}/meta.json: it was written before layout-independent "
            f"checkpoints or is incomplete; resume it with the same layout and save again"
        )
    return _model_config(ckpt / CONFIG), ckpt / FOLDER


def _model_config(config_file: Path) -> ModelConfig:
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: cannot tell the model's shape; the checkpoint is incomplete")
    model = (yaml.safe_load(config_file.read_text()) or {}).get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{config_file} has no 'model' section; the checkpoint is incomplete")
    return model_config_from_dict(model, str(config_file))


def _has_buffers(cfg: ModelConfig) -> bool:
    with torch.device("meta"):
        model = build_converted_model(cfg)
    return len(model.state_dict()) > len(dict(model.named_parameters(remove_duplicate=False)))


def _plain_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each parameter's first name and shape, in the model's order (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_converted_model(cfg)  # converters' parameters are the checkpoint's too
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _shapes(source: Path, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    if source.name == CONSOLIDATED:
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return _plain_names(cfg)


def _tensors(source: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    if source.name == CONSOLIDATED:
        with safe_open(str(source), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)  # integer buffers (quantised weights) keep their dtype
                yield name, tensor.float() if tensor.is_floating_point() else tensor
        return
    rebuilt = _rebuilt_base(source, cfg)  # a fine-tuning checkpoint stores only what trains
    shapes = _plain_names(cfg)
    for name, shape in shapes.items():
        file = source / f"{name}.safetensors"
        if name in rebuilt and not file.is_file():
            yield name, rebuilt.pop(name)
            continue
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint under {source.parent} is incomplete")
        with safe_open(str(file), framework="pt") as f:
            tensor = f.get_tensor("fp32")
        assert tuple(tensor.shape) == shape, (name, tensor.shape, shape)
        yield name, tensor
    yield from ((n, t) for n, t in rebuilt.items() if n not in shapes)  # buffers, after the parameters


def _rebuilt_base(source: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """What a checkpoint does not store: the frozen weights when it points at its base (universal.py) and
    the buffers of its converters (a quantised base): the model rebuilt as training built it (init_weights
    with the run's seed, the base's weights, the converters). Empty for a checkpoint that stores everything."""
    from llmtrain.models import build_model
    from llmtrain.models.converters import apply_converters
    from llmtrain.parallel.universal import frozen_base

    base = frozen_base(source.parent)
    with torch.device("meta"):
        converted = build_converted_model(cfg)
    buffers = set(converted.state_dict()) - {n for n, _ in converted.named_parameters(remove_duplicate=False)}
    if base is None and not buffers:
        return {}
    seed = ((yaml.safe_load((source.parent / CONFIG).read_text()) or {}).get("train") or {}).get("seed", 0)
    model = build_model(dataclasses.replace(_plain_config(cfg), init_from=None))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.init_weights()  # type: ignore[operator]
        if base is not None:
            init_model_from(model, base)
        apply_converters(model, cfg)
    # frozen parameters (only when a base stands in for them) and a converter's buffers (a quantised base,
    # QLoRA: what the converters make of those weights; never in universal/)
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad and base is not None}
    return {**frozen, **{n: t for n, t in model.state_dict().items() if n in buffers}}


def _plain_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` without its converters (and without `model.lora`, which would add its converter back)."""
    plain: dict[str, Any] = {"converters": [], **({"lora": None} if hasattr(cfg, "lora") else {})}
    return dataclasses.replace(cfg, **plain)


def _tied_state_dict(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the second name of each tied parameter (e.g. lm_head.weight) pointing at the same tensor."""
    with torch.device("meta"):
        model = build_converted_model(cfg)
    first = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first[id(p)] not in weights:
            raise CheckpointError(f"the checkpoint has no weight for '{first[id(p)]}'; it is incomplete")
        out[name] = weights[first[id(p)]]
    persistent = model.state_dict().keys()
    for name, _ in model.named_buffers():  # a converter's stored buffers (quantised weights' integers)
        if name in persistent:
            if name not in weights:
                raise CheckpointError(f"the checkpoint has no '{name}'; it is incomplete")
            out[name] = weights[name]
    return out


def _config_text(cfg: ModelConfig, source: Path) -> str:
    """The source checkpoint's whole config when there is one (so a consolidated dir reads like a run)."""
    src = source.parent / CONFIG
    return src.read_text() if src.is_file() else model_config_yaml(cfg)
