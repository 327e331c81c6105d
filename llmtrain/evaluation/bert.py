"""BERT tasks for `llmtrain eval MODEL --tasks bert_mlm,bert_classify`, reported in lm-eval's results format
(the same table and JSON as the decoder tasks, so one reader handles both):

- `bert_mlm`: masked-LM accuracy (`acc`: the masked token is the argmax) and `perplexity` of the masked tokens,
  plus next-sentence accuracy (`nsp_acc`), on the validation split of the model's data section with
  `data.sample_kind=bert` (the pre-training masking, deterministic). Needs a pre-training model (MLM head).
- `bert_classify`: accuracy of a fine-tuned classifier (`model.num_labels > 0`) on the held-out passages of
  `data.sample_kind=source_class` (llmtrain/data/classify.py; chance 1/3).

The model's own data section (its config.yaml) gives the tokenizer; `--limit` caps the sequences per task,
else `--batches` micro-batches of `--batch-size`. Standard errors are binomial, sqrt(p (1 - p) / (n - 1)).
lm-evaluation-harness is not needed (the table falls back to a plain one without it). One process.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from llmtrain.errors import UserError

BERT_TASKS = ("bert_mlm", "bert_classify")


def is_bert_spec(spec: str | list[str]) -> bool:
    """True when TASKS names BERT tasks only; UserError when it mixes them with lm-eval tasks."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bert = [n for n in names if n in BERT_TASKS]
    if bert and len(bert) != len(names):
        other = [n for n in names if n not in BERT_TASKS]
        raise UserError(
            f"--tasks mixes BERT tasks ({', '.join(bert)}) with decoder tasks ({', '.join(other)}); "
            f"evaluate a BERT model on {', '.join(BERT_TASKS)} only"
        )
    return bool(bert)


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / max(1, n - 1))


def run_bert_tasks(
    checkpoint: str | Path,
    tasks: str | list[str],
    device: str = "",
    batch_size: int = 8,
    limit: int | None = None,
    batches: int = 50,
    seq_len: int = 0,
) -> dict[str, Any]:
    """lm-eval-shaped results ({'results': {task: {'acc,none': ..., 'acc_stderr,none': ...}}, ...}) of the
    BERT model at `checkpoint` on `tasks` (names from BERT_TASKS)."""
    import torch

    from llmtrain.inference import _checkpoint_dir, _saved_config, default_device
    from llmtrain.models.converters import build_converted_model
    from llmtrain.models.registry import family_of
    from llmtrain.parallel.consolidate import load_model_weights

    names = [s.strip() for s in (tasks.split(",") if isinstance(tasks, str) else tasks) if s.strip()]
    device = default_device(device)
    cfg, weights = load_model_weights(checkpoint)
    if family_of(cfg).name != "bert":
        raise UserError(
            f"{checkpoint} holds a model.arch={cfg.arch} model; {', '.join(BERT_TASKS)} need a BERT model "
            f"(decoders take lm-eval tasks, e.g. llmtrain_cloze)"
        )
    num_labels = getattr(cfg, "num_labels", 0)
    for name in names:
        if name == "bert_mlm" and num_labels:
            raise UserError(
                f"bert_mlm needs the masked-LM head of a pre-trained BERT; {checkpoint} is a classifier "
                f"(model.num_labels={num_labels}): evaluate it on bert_classify"
            )
        if name == "bert_classify" and not num_labels:
            raise UserError(
                f"bert_classify needs a fine-tuned classifier (model.num_labels > 0); {checkpoint} is a "
                f"pre-trained BERT: fine-tune it first (recipes/bert_finetune_debug.yaml) or evaluate bert_mlm"
            )
    saved = _saved_config(_checkpoint_dir(checkpoint))
    seq_len = seq_len or saved.train.seq_len
    model = build_converted_model(cfg)
    model.load_state_dict(weights)
    model.to(device).eval()
    n_batches = math.ceil(limit / batch_size) if limit else batches
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        kind = "bert" if name == "bert_mlm" else "source_class"
        data_cfg = dataclasses.replace(saved.data, sample_kind=kind)
        with torch.no_grad():
            metrics = (_mlm if name == "bert_mlm" else _classify)(
                model, _val_batches(data_cfg, seq_len, batch_size, n_batches, limit, cfg.vocab_size), device
            )
        results[name] = {"alias": name, **metrics}
    return {
        "results": results,
        "versions": {n: 1.0 for n in names},
        "n-shot": {n: 0 for n in names},
        "higher_is_better": {n: {"acc": True, "nsp_acc": True, "perplexity": False} for n in names},
        "config": {"model": "llmtrain", "model_args": str(checkpoint), "limit": limit, "batch_size": batch_size},
    }


def _val_batches(
    data_cfg: Any, seq_len: int, batch_size: int, n: int, limit: int | None, model_vocab_size: int
) -> list[dict[str, Any]]:
    from llmtrain.data import build_data

    data = build_data(
        data_cfg, seq_len=seq_len, seed=0, micro_batch_size=batch_size, grad_accum=1, dp_rank=0, dp_size=1
    )
    data.check_model_vocab(model_vocab_size)  # a model reads only its own tokenizer's ids
    batches = data.val_batches(n)
    if limit:  # the last batch cut to `limit` sequences in all
        keep = limit - batch_size * (len(batches) - 1)
        if batches and 0 < keep < batch_size:
            batches[-1] = {k: v[:keep] for k, v in batches[-1].items()}
    return batches


def _mlm(model: Any, batches: list[dict[str, Any]], device: str) -> dict[str, Any]:
    import torch.nn.functional as F

    right = total = nsp_right = pairs = 0
    nll = 0.0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        chosen = b["mlm_labels"] != -100  # (B, T)
        logits, nsp = model(b["input_ids"], b["token_type_ids"], b["attention_mask"], chosen)  # (N, V), (B, 2)
        labels = b["mlm_labels"][chosen]
        nll += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        right += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
        nsp_right += int((nsp.argmax(-1) == b["nsp_labels"]).sum())
        pairs += b["nsp_labels"].numel()
    acc, nsp_acc = right / max(1, total), nsp_right / max(1, pairs)
    return {
        "sample_len": pairs,
        "masked_tokens": total,
        "acc,none": acc,
        "acc_stderr,none": _stderr(acc, total),
        "perplexity,none": math.exp(nll / max(1, total)),
        "nsp_acc,none": nsp_acc,
        "nsp_acc_stderr,none": _stderr(nsp_acc, pairs),
    }


def _classify(model: Any, batches: list[dict[str, Any]], device: str) -> dict[str, Any]:
    right = n = 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        logits = model(b["input_ids"], b.get("token_type_ids"), b.get("attention_mask"))  # (B, K)
        right += int((logits.argmax(-1) == b["class_labels"]).sum())
        n += b["class_labels"].numel()
    acc = right / max(1, n)
    return {"sample_len": n, "acc,none": acc, "acc_stderr,none": _stderr(acc, n)}


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's table when it is installed, else a plain one with the same columns."""
    try:
        from lm_eval.utils import make_table

        return str(make_table(results))
    except ImportError:
        rows = ["|Tasks|Metric|Value|Stderr|", "|---|---|---:|---:|"]
        for task, ms in results["results"].items():
            for key, v in ms.items():
                if "," in key and "_stderr" not in key:
                    se = ms.get(key.replace(",", "_stderr,"))
                    rows.append(f"|{task}|{key.split(',')[0]}|{v:.4f}|{'' if se is None else f'{se:.4f}'}|")
        return "\n".join(rows)
