"""The frozen reference model of preference tuning, handled like the distillation teacher: a whole module on
every rank, a ZeRO-3 inference engine (both from `llmtrain.compress.distill.teacher.load_teacher`), or its
sequence log-probs of every pair of the run computed once (rank 0) and found again by a hash of the pair.

The cache is keyed by the reference's identity (a digest of its checksums or file) and the pairs' tokens, and
written with `checksums.json`, so a cache of another reference or a damaged file is refused, never used.

Shape legend:  B pairs  T sequence
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmtrain.errors import CheckpointError, ConfigError, UserError

if TYPE_CHECKING:
    from llmtrain.config import Config, Derived

PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def reference_path(cfg: Config) -> str:
    """dpo.reference, or the policy's starting weights (model.init_from) when it is empty."""
    return cfg.dpo.reference or cfg.model.init_from or ""


def load_reference(cfg: Config, device: torch.device) -> tuple[nn.Module, Any]:
    """The frozen, eval-mode reference (collective with dpo.reference_zero_stage=3) and its model config."""
    from llmtrain.compress.distill.teacher import load_teacher

    d = cfg.dpo
    try:
        return load_teacher(
            reference_path(cfg), d.reference_precision, device, d.reference_zero_stage, cfg.parallel.deepspeed_overrides
        )
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace("distill.teacher", "dpo.reference", 1)) from None


def fingerprint(path: str | Path) -> str:
    """A digest that changes whenever the reference's weights do: of its checksums.json (llmtrain checkpoints and
    model directories), of its model file (.gguf, a Hugging Face directory's model.safetensors)."""
    from llmtrain.integrity import CHECKSUMS, file_digest
    from llmtrain.parallel.checkpoint_paths import resolve_checkpoint

    p = Path(path)
    if p.is_file():
        return file_digest(p)
    for candidate in (p / CHECKSUMS, p / "model.safetensors"):
        if candidate.is_file():
            return file_digest(candidate)
    return file_digest(resolve_checkpoint(p) / CHECKSUMS)


def pair_keys(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A 64-bit hash per pair of the tokens and label masks of both its answers, (B,)."""
    from llmtrain.compress.distill.cache import row_keys

    return row_keys(torch.cat([batch[k].long().cpu() for k in PAIR_KEYS], dim=1))


class ReferenceCache:
    """The reference's summed log-probs of the chosen and rejected answer of every pair of a run."""

    META, FILE = "meta.json", "logps.safetensors"

    def __init__(self, directory: str | Path):
        from safetensors.torch import load_file

        from llmtrain.integrity import verify_dir

        self.dir = Path(directory)
        verify_dir(self.dir, fix=f"delete {self.dir} to rebuild it, or point dpo.cache_dir at a new directory")
        self.meta = json.loads((self.dir / self.META).read_text())
        t = load_file(str(self.dir / self.FILE))
        self.chosen, self.rejected = t["chosen"], t["rejected"]  # (rows,) float32
        self.row = {k: i for i, k in enumerate(t["keys"].tolist())}

    @staticmethod
    def complete(directory: str | Path) -> bool:
        from llmtrain.integrity import has_checksums

        return has_checksums(directory)

    def lookup(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference log-probs of the chosen answers, of the rejected ones), each (B,), on the batch's device."""
        try:
            rows = torch.tensor([self.row[k] for k in pair_keys(batch).tolist()])
        except KeyError:
            raise UserError(
                f"a preference pair is not in the reference cache {self.dir} (built for {self.meta['describe']}); "
                f"delete the directory to rebuild it for this run, or point dpo.cache_dir at a new one"
            ) from None
        dev = batch["chosen_input_ids"].device
        return self.chosen[rows].to(dev), self.rejected[rows].to(dev)


@torch.no_grad()
def build_reference_cache(
    directory: str | Path,
    logps: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    batches: Iterable[dict[str, torch.Tensor]],
    meta: dict[str, Any],
) -> None:
    """Run `logps` (the reference's (chosen, rejected) sequence log-probs of a micro-batch) over `batches` once;
    checksums.json last (its presence = complete)."""
    from safetensors.torch import save_file

    from llmtrain.integrity import write_checksums

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys, chosen, rejected, seen = [], [], [], set()
    for mb in batches:
        k = pair_keys(mb)
        new = torch.tensor([x not in seen for x in k.tolist()])
        if not new.any():
            continue
        seen.update(k[new].tolist())
        c, r = logps(mb)
        keys.append(k[new])
        chosen.append(c.float().cpu()[new])
        rejected.append(r.float().cpu()[new])
    if not keys:
        raise ConfigError(f"dpo.cache_dir={directory}: the run has no preference pairs to cache")
    save_file(
        {"keys": torch.cat(keys), "chosen": torch.cat(chosen), "rejected": torch.cat(rejected)},
        str(directory / ReferenceCache.FILE),
    )
    (directory / ReferenceCache.META).write_text(json.dumps({**meta, "rows": len(seen)}, indent=1))
    write_checksums(directory)


def ensure_reference_cache(
    cfg: Config,
    derived: Derived,
    device: torch.device,
    logps: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
) -> ReferenceCache:
    """Build dpo.cache_dir on rank 0 when it is not complete (every training pair of the run and the held-out
    pairs every rank evaluates), then every rank loads it and checks it belongs to this reference."""
    from llmtrain.data import build_data
    from llmtrain.utils import barrier, print0, rank

    d, t = cfg.dpo, cfg.train
    ident = hashlib.sha256(fingerprint(reference_path(cfg)).encode()).hexdigest()[:16]
    if not ReferenceCache.complete(d.cache_dir) and rank() == 0:
        reference, _ = load_reference(cfg, device)  # whole: validate_dpo refuses a ZeRO-3 reference here
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
        # every rank runs ceil(eval_batches / dp) held-out forwards: cover the ones past eval_batches too
        n_val = -(-t.eval_batches // derived.dp_size) * derived.dp_size
        batches = [mb for s in range(t.max_steps) for mb in data.train_batches(s)] + list(data.val_batches(n_val))
        describe = f"reference {reference_path(cfg)}, seed {t.seed}, {t.max_steps} steps of {t.global_batch_size} pairs"
        print0(f"building the reference cache {d.cache_dir}: {describe}")
        meta = {"reference": ident, "describe": describe}
        build_reference_cache(
            d.cache_dir, lambda mb: logps(reference, {k: v.to(device) for k, v in mb.items()}), batches, meta
        )
        del reference
    barrier()
    cache = ReferenceCache(d.cache_dir)
    if cache.meta.get("reference") != ident:
        raise ConfigError(
            f"dpo.cache_dir={d.cache_dir} holds the log-probs of another reference ({cache.meta.get('describe')}), "
            f"not of {reference_path(cfg)}; delete it to rebuild it, or point dpo.cache_dir at a new directory"
        )
    return cache
