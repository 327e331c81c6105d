"""The llmtrain model directory, and its one writer.

A model directory holds `model.safetensors` (each parameter once, by its plain-model name),
`config.yaml` (at least a `model:` section), optionally `tokenizer/` and a producer's record (`prune.json`),
and `checksums.json` (llmtrain/integrity.py), written last. `llmtrain consolidate`, `llmtrain prune` and
`llmtrain import-hf` all write it through `writing()`; `load_model_weights`, `model.init_from`, eval and
export read it like a checkpoint.

Policy for the output path, the same for every producer:
- Atomic: files go to a hidden temp directory beside the output, checksums last, then one rename. A
  crash leaves either the old output or the new one, never a half-written one under the real name.
- An output that exists and is not empty is refused (a `UserError` naming it) unless the caller asks to
  replace it (`replace=True`, the commands' `--replace`): it may be an earlier result or an unrelated
  folder, and deleting either silently is worse than asking. An empty directory is used as is. A replaced
  output is swapped out only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrain.errors import UserError

if TYPE_CHECKING:
    import torch

    from llmtrain.config import Config
    from llmtrain.models.config import ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


@contextmanager
def writing(out: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp directory to fill; on success add checksums and publish it as `out` (see the policy)."""
    from llmtrain.integrity import write_checksums

    out = check_output(out, replace)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        write_checksums(tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(out: str | Path, replace: bool = False) -> Path:
    """Refuse an output path the policy forbids; producers call it first, before any slow work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another output path")
    if not replace and out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new output directory or pass --replace to replace it")
    return out


def _publish(tmp: Path, out: Path) -> None:
    old = None
    if out.is_dir():
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """`directory/model.safetensors` of whole tensors (fp32 unless already another float type)."""
    from safetensors.torch import save_file

    save_file(
        {n: t.detach().contiguous() for n, t in tensors.items()},
        str(directory / WEIGHTS),
        metadata={"format": "pt", **(metadata or {})},
    )


def stream_weights(
    directory: Path,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    metadata: dict[str, str] | None = None,
) -> None:
    """`directory/model.safetensors` written one tensor at a time: the header comes from `shapes` alone,
    then each tensor of `tensors` (in `shapes` order) is converted, written and dropped."""
    import torch

    kinds = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = dtype.itemsize * _numel(shape)
        header[name] = {"dtype": kinds[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(directory / WEIGHTS, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, tensor), expected in zip(tensors, shapes):
            assert name == expected, (name, expected)
            f.write(tensor.to(dtype).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_config_text(directory: Path, text: str) -> None:
    """`directory/config.yaml`: a whole run config, or `{"model": ...}` alone (`model_config_yaml`)."""
    (directory / CONFIG).write_text(text)


def model_config_yaml(model_cfg: ModelConfig) -> str:
    import dataclasses

    import yaml

    return yaml.safe_dump({"model": dataclasses.asdict(model_cfg)}, sort_keys=False)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def model_tensors(model: torch.nn.Module, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """What a model directory stores of `model`: its parameters (tied ones once) as `float_dtype` (fp32 by
    default) and its persistent buffers as they are (a converter's, e.g. quantised weights' integers)."""
    import torch

    out = {n: p.detach().to(float_dtype or torch.float32) for n, p in model.named_parameters()}
    persistent = model.state_dict().keys()
    out.update({n: b.detach() for n, b in model.named_buffers() if n in persistent})
    return out


def write_model(
    out: str | Path,
    cfg: Config,
    model: torch.nn.Module,
    records: dict[str, Any] | None = None,
    replace: bool = False,
    float_dtype: torch.dtype | None = None,
) -> Path:
    """A model directory of a plain (or converted) model: `model_tensors(model, float_dtype)`, the whole run
    config `cfg` as config.yaml and each of `records` ({file name: JSON-able}) as a JSON file beside them."""
    from llmtrain.config import save_config

    with writing(out, replace) as tmp:
        write_weights(tmp, model_tensors(model, float_dtype))
        save_config(cfg, tmp / CONFIG)
        for name, record in (records or {}).items():
            (tmp / name).write_text(json.dumps(record, indent=1))
    return Path(out)


def write_model_dir(
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
    tokenizer_json: Path | None = None,
    replace: bool = False,
    tokenizer_config: dict[str, Any] | None = None,
) -> Path:
    """An llmtrain model directory of a plain state dict (an import): each parameter once, plain names;
    `tokenizer_config` (special tokens, chat template) goes beside the tokenizer as tokenizer_config.json."""
    import torch

    from llmtrain.models.converters import build_converted_model

    with torch.device("meta"):  # first names (tied copies once), a converter's (LoRA adapters) included
        names = [n for n, _ in build_converted_model(cfg).named_parameters()]
    with writing(out_dir, replace) as tmp:
        write_weights(tmp, {n: state_dict[n].float() for n in names})
        write_config_text(tmp, model_config_yaml(cfg))
        if tokenizer_json is not None:
            (tmp / "tokenizer").mkdir()
            shutil.copyfile(tokenizer_json, tmp / "tokenizer" / "tokenizer.json")
            if tokenizer_config:
                (tmp / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return Path(out_dir)
