"""`build_data`: turn a `DataConfig` plus the run's batch layout into the object the trainer uses."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmtrain.data.config import DataConfig
from llmtrain.errors import DataError

if TYPE_CHECKING:
    from llmtrain.data.contract import RunData


def resolve_sources(cfg: DataConfig) -> list[tuple[Path, float]]:
    """(dataset dir, weight) for every source; 'bundled' prepares the bundled corpus into the cache."""
    from llmtrain.data.bundled import bundled_dataset_dir

    specs = [(s.path, s.weight) for s in cfg.sources] or [(cfg.path, 1.0)]
    out = []
    for path, weight in specs:
        if weight < 0:
            raise DataError(f"data.sources: weight {weight} of '{path}' is negative; use a weight >= 0")
        out.append((bundled_dataset_dir(cfg) if path == "bundled" else Path(path).expanduser(), float(weight)))
    return out


def _check_layout(seq_len: int, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int) -> None:
    if seq_len < 1 or micro_batch_size < 1 or grad_accum < 1 or dp_size < 1:
        raise DataError(
            f"seq_len, micro_batch_size, grad_accum and dp_size must be >= 1; got {seq_len}, "
            f"{micro_batch_size}, {grad_accum}, {dp_size}"
        )
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")


def build_data(
    cfg: DataConfig, *, seq_len: int, seed: int, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int
) -> RunData:
    from llmtrain.data.loader import CausalData, PreparedSource

    _check_layout(seq_len, micro_batch_size, grad_accum, dp_rank, dp_size)
    if cfg.doc_mask and (cfg.stream or cfg.sample_kind != "causal"):
        raise DataError(
            "data.doc_mask works on packed causal samples of prepared data only; set data.doc_mask=false "
            "(or data.sample_kind=causal without data.stream)"
        )
    if cfg.tokenizer_path and cfg.sample_kind != "source_class":
        raise DataError(
            f"data.tokenizer_path is read by data.sample_kind=source_class only (prepared data carries its own "
            f"tokenizer: `llmtrain prepare-data --tokenizer {cfg.tokenizer_path}`); unset it"
        )
    kwargs = dict(
        seq_len=seq_len,
        seed=seed,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    if cfg.stream:
        from llmtrain.data.bundled import bundled_tokenizer_dir
        from llmtrain.data.streaming import StreamingData

        if cfg.sample_kind != "causal":
            raise DataError("data.stream supports data.sample_kind=causal only; prepare BERT data with prepare-data")
        tok_dir = cfg.stream_tokenizer or str(bundled_tokenizer_dir(cfg))
        return StreamingData(cfg, tok_dir, **kwargs)
    if cfg.sample_kind == "source_class":
        from llmtrain.data.classify import SourceClassData

        return SourceClassData(cfg, **kwargs)
    pairs = resolve_sources(cfg)
    sources = [PreparedSource(p, cfg.verify) for p, _ in pairs]
    if cfg.sample_kind == "bert":
        from llmtrain.data.bert import BertData

        for s in sources:
            if s.has_mask:
                raise DataError(
                    f"{s.path}: {s.kind} data (with a loss mask) cannot make BERT samples; use data.sample_kind=causal"
                )
        return BertData(sources, [w for _, w in pairs], cfg=cfg, **kwargs)
    if any(s.kind == "preference" for s in sources):  # chosen/rejected pairs for a preference objective (DPO)
        from llmtrain.data.loader import PreferenceData

        return PreferenceData(sources, [w for _, w in pairs], blend_block=cfg.blend_block, **kwargs)
    return CausalData(sources, [w for _, w in pairs], doc_mask=cfg.doc_mask, blend_block=cfg.blend_block, **kwargs)
