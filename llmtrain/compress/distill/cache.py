"""The teacher-logit cache: the teacher's top-k log-probs of every training sample of a run, computed once
(rank 0) and found again by a hash of the sample's tokens, so a student run pays no teacher forward.

Shape legend:  B batch  T sequence  V vocabulary  k cached logits per position
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import UserError

if TYPE_CHECKING:
    from llmtrain.config import Config, Derived


def row_keys(input_ids: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash per row of (B, T) token ids (wrapping integer arithmetic, the same on any device)."""
    g = torch.Generator().manual_seed(0x5EED)
    mult = torch.randint(1, 2**62, (input_ids.shape[-1],), generator=g, dtype=torch.int64)
    return (input_ids.long().cpu() * mult).sum(-1) ^ input_ids.shape[-1]


class TeacherCache:
    """Top-k teacher logits of every training sample of a run, found by the hash of its tokens."""

    META = "meta.json"

    def __init__(self, directory: str | Path):
        from safetensors.torch import load_file

        self.dir = Path(directory)
        self.meta = json.loads((self.dir / self.META).read_text())
        parts = [load_file(str(self.dir / f)) for f in self.meta["files"]]
        self.values = torch.cat([p["values"] for p in parts])  # (rows, T, k) teacher log-probs at meta's tau
        self.indices = torch.cat([p["indices"] for p in parts])  # (rows, T, k) int32
        keys = torch.cat([p["keys"] for p in parts]).tolist()
        self.row = {k: i for i, k in enumerate(keys)}

    @staticmethod
    def complete(directory: str | Path) -> bool:
        return (Path(directory) / TeacherCache.META).is_file()

    def lookup(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher log-probs, token indices), each (B, T, k), on input_ids' device."""
        try:
            rows = torch.tensor([self.row[k] for k in row_keys(input_ids).tolist()])
        except KeyError:
            raise UserError(
                f"a training sample is not in the teacher cache {self.dir} (built for "
                f"{self.meta['describe']}); delete the directory to rebuild it for this run, or "
                f"point distill.cache_dir at a new one"
            ) from None
        dev = input_ids.device
        return self.values[rows].to(dev), self.indices[rows].to(dev)


def _all_position_logits(
    teacher: nn.Module, mb: dict[str, torch.Tensor], rows: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The teacher's vocabulary logits at every position of the chosen rows, (b, T, V). A BERT teacher's
    masked-LM head runs on all positions: which ones a student is scored on is read from its batch later
    (the input ids, which the cache is keyed by, fix the teacher's output but not the chosen positions)."""
    ids = mb["input_ids"][rows].to(device)
    if "mlm_labels" in mb:
        return teacher(ids, mb["token_type_ids"][rows].to(device), mb["attention_mask"][rows].to(device))[0]
    return teacher(ids)


@torch.no_grad()
def build_cache(
    directory: str | Path,
    teacher: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    top_k: int,
    tau: float,
    describe: str,
    total: int,
    device: torch.device,
    rows_per_file: int = 4096,
) -> None:
    """Run the teacher over `batches` once and write its top-k log-probs at temperature `tau`; meta.json
    last (its presence = complete)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    buf: dict[str, list[torch.Tensor]] = {"keys": [], "values": [], "indices": []}
    n_rows = 0

    def flush() -> None:
        if buf["keys"]:
            name = f"part_{len(files):05d}.safetensors"
            save_file({k: torch.cat(v).contiguous() for k, v in buf.items()}, str(directory / name))
            files.append(name)
            for v in buf.values():
                v.clear()

    seen: set[int] = set()
    for mb in tqdm(batches, total=total, desc="teacher cache", unit="batch", disable=None):
        ids = mb["input_ids"]
        keys = row_keys(ids)
        new = torch.tensor([k not in seen for k in keys.tolist()])
        if not new.any():
            continue
        seen.update(keys[new].tolist())
        logprobs = F.log_softmax(_all_position_logits(teacher, mb, new, device).float() / tau, dim=-1)  # (b, T, V)
        vals, idx = logprobs.topk(top_k, dim=-1)  # (b, T, k)
        buf["keys"].append(keys[new])
        buf["values"].append(vals.cpu())
        buf["indices"].append(idx.int().cpu())
        n_rows += int(new.sum())
        if sum(len(k) for k in buf["keys"]) >= rows_per_file:
            flush()
    flush()
    meta = {"files": files, "rows": n_rows, "top_k": top_k, "temperature": tau, "describe": describe}
    tmp = directory / (TeacherCache.META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(directory / TeacherCache.META)


def ensure_cache(cfg: Config, teacher: nn.Module | None, device: torch.device, derived: Derived) -> TeacherCache:
    """Build distill.cache_dir on rank 0 when it is not complete (every training sample of the run), then
    every rank loads it. `derived` (config.Derived) gives the micro-batches per step of all replicas."""
    from llmtrain.config import ConfigError
    from llmtrain.data import build_data
    from llmtrain.utils import barrier, print0, rank

    d, t = cfg.distill, cfg.train
    if not TeacherCache.complete(d.cache_dir):
        if teacher is None:
            raise ConfigError(
                f"distill.cache_dir={d.cache_dir} is not complete and there is no distill.teacher to build it"
            )
        if rank() == 0:
            per_step = derived.grad_accum * derived.dp_size  # micro-batches of one step over every replica
            data = build_data(
                cfg.data,
                seq_len=t.seq_len,
                seed=t.seed,
                micro_batch_size=t.micro_batch_size,
                grad_accum=per_step,
                dp_rank=0,
                dp_size=1,
            )
            batches = (mb for s in range(t.max_steps) for mb in data.train_batches(s))
            describe = f"teacher {d.teacher}, seed {t.seed}, {t.max_steps} steps of {t.global_batch_size} x {t.seq_len}"
            print0(f"building the teacher cache {d.cache_dir}: {describe}, top-{d.top_k}")
            build_cache(d.cache_dir, teacher, batches, d.top_k, d.temperature, describe, t.max_steps * per_step, device)
        barrier()
    cache = TeacherCache(d.cache_dir)
    for key in ("top_k", "temperature"):
        if cache.meta.get(key) != getattr(d, key):
            raise ConfigError(
                f"distill.cache_dir={d.cache_dir} was built with {key}={cache.meta.get(key)} but "
                f"distill.{key}={getattr(d, key)}; set distill.{key}={cache.meta.get(key)} or use a new "
                f"cache_dir"
            )
    return cache
