"""`llmtrain generate` and `llmtrain eval`: text from, and perplexity of, a trained or imported decoder.

CHECKPOINT is a run directory (its latest checkpoint), a `checkpoints/` folder, one `step_*` folder, a
consolidated folder or an `llmtrain import-hf` folder. The weights are read one parameter at a time
from the layout-independent copy every checkpoint holds (`load_model_weights`), whatever ZeRO stage,
tensor or pipeline layout wrote it, so only one copy of the model is ever in memory.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrain.errors import UserError

if TYPE_CHECKING:  # torch loads on first use, so `llmtrain --help` stays fast
    import torch

TOKENIZER_DIR = "tokenizer"


def load_decoder(path: str | Path, device: str = "cpu") -> tuple[Any, torch.nn.Module]:
    """(ModelConfig, eval-mode decoder with the checkpoint's weights) of the checkpoint at `path`."""
    import torch

    from llmtrain.models.converters import build_converted_model
    from llmtrain.models.registry import FAMILIES, family_of
    from llmtrain.parallel.consolidate import load_model_weights

    cfg, weights = load_model_weights(path)
    family = family_of(cfg)
    if not family.generative:
        raise UserError(f"{path} holds a model.arch={family.name} model; generate and eval need a decoder "
                         f"(a generative family: {', '.join(f.name for f in FAMILIES.values() if f.generative)})")
    with torch.device("meta"):
        model = build_converted_model(cfg)  # the checkpoint's converters too: their parameters are in weights
    model.load_state_dict(weights, assign=True)
    if cfg.tie_embeddings:  # assign=True replaces the shared Parameter object per name: tie again
        model.lm_head.weight = model.wte.weight
    return cfg, model.to(device).eval()


def checkpoint_tokenizer(path: str | Path) -> Any:
    """The tokenizer a checkpoint was trained with: its own `tokenizer/` folder (import-hf writes one),
    else the one its saved config's data section names (bundled corpus, prepared dataset or stream)."""
    from llmtrain.data import load_tokenizer
    from llmtrain.data.bundled import bundled_tokenizer_dir

    root = _checkpoint_dir(path)
    for d in (root / TOKENIZER_DIR, Path(path) / TOKENIZER_DIR):
        if d.is_dir():
            return load_tokenizer(d)
    data = _saved_config(root).data
    if data.stream:
        return load_tokenizer(data.stream_tokenizer or bundled_tokenizer_dir(data))
    first = data.sources[0].path if data.sources else data.path
    return load_tokenizer(bundled_tokenizer_dir(data) if first == "bundled" else Path(first))


def _checkpoint_dir(path: str | Path) -> Path:
    from llmtrain.train.checkpoint import resolve_checkpoint

    p = Path(path)
    if (p / "config.yaml").is_file() and not (p / "checkpoints").exists():
        return p  # consolidated or imported folder, or a step folder
    return resolve_checkpoint(p)


def _saved_config(ckpt: Path) -> Any:
    from llmtrain.config import load_config

    if not (ckpt / "config.yaml").is_file():
        raise UserError(f"{ckpt} has no config.yaml; pass a checkpoint written by llmtrain")
    return load_config(ckpt / "config.yaml")


def _device(name: str) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from llmtrain.data import load_tokenizer
    from llmtrain.models.generation import generate

    device = _device(args.device)
    cfg, model = load_decoder(args.checkpoint, device)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else checkpoint_tokenizer(args.checkpoint)
    ids = tok.encode(args.prompt)
    if not ids:
        raise UserError("--prompt encodes to no tokens; give at least one character")
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, prompt, args.max_new_tokens, cfg.block_size, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, generator=gen, use_cache=not args.no_cache)
    print(tok.decode(out[0].tolist()))
    return 0


def perplexity_on(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: str) -> tuple[float, int]:
    """(mean next-token loss over every labelled token, number of tokens) of `batches`."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="eval", unit="batch", disable=None):
            logits = model(batch["input_ids"].to(device)).float()
            labels = batch["labels"].to(device)
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((labels != -100).sum())
    return total / max(count, 1), count


def cmd_eval(args: argparse.Namespace) -> int:
    from llmtrain.data import build_data

    if args.tasks:
        from llmtrain.evaluation.run import cmd_eval_tasks

        return cmd_eval_tasks(args)

    device = _device(args.device)
    cfg, model = load_decoder(args.checkpoint, device)
    data_cfg = _eval_data_config(args)
    seq_len = args.seq_len or cfg.block_size
    if seq_len > cfg.block_size:
        raise UserError(f"--seq-len {seq_len} exceeds the model's block_size {cfg.block_size}")
    data = build_data(data_cfg, seq_len=seq_len, seed=0, micro_batch_size=args.batch_size, grad_accum=1,
                      dp_rank=0, dp_size=1)
    if data.vocab_size > cfg.vocab_size:
        raise UserError(f"--data {args.data}: its tokenizer has {data.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size}; evaluate on data prepared with the model's tokenizer")
    try:
        expected = checkpoint_tokenizer(args.checkpoint).hash
    except ValueError:
        expected = None  # no recorded tokenizer: trust the caller
    if expected is not None and data.tokenizer.hash != expected:
        raise UserError(f"--data {args.data} was tokenized with a different tokenizer (hash {data.tokenizer.hash}) "
                         f"than the checkpoint's ({expected}); prepare it with the checkpoint's tokenizer")
    loss, n = perplexity_on(model, data.val_batches(args.batches), device)
    print(f"eval {args.checkpoint} on {args.data}: {n:,} tokens | loss {loss:.4f} | perplexity {math.exp(loss):.2f}")
    return 0


def _eval_data_config(args: argparse.Namespace) -> Any:
    """The data section to evaluate on: the checkpoint's own (for its tokenizer settings) with --data as path."""
    import dataclasses

    from llmtrain.data import DataConfig

    try:
        base = _saved_config(_checkpoint_dir(args.checkpoint)).data
    except ValueError:
        base = DataConfig()
    return dataclasses.replace(base, path=args.data, sources=[], stream="")


def _doc_paragraph(i: int) -> str:
    """Paragraph i of this module's docstring as one line (a --help description, whole sentences)."""
    return " ".join(__doc__.split("\n\n")[i].split())


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (greedy, temperature, top-k, top-p; KV cache)",
                       description="Continue a prompt with a trained or imported decoder. " + _doc_paragraph(1))
    p.add_argument("checkpoint", help="run, checkpoint, consolidated or import-hf directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="", help="tokenizer directory or tokenizer.json (default: the checkpoint's)")
    p.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window each step (no KV cache)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("eval", help="perplexity of a checkpoint on the validation split of prepared data",
                       description="Perplexity of a decoder checkpoint on prepared data. " + _doc_paragraph(1))
    p.add_argument("checkpoint", help="run, checkpoint, consolidated or import-hf directory")
    p.add_argument("--data", default="bundled", help="prepared dataset directory (llmtrain prepare-data) or 'bundled'")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: the model's block_size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=50, help="at most this many validation batches")
    p.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--tasks", default="", help="lm-evaluation-harness tasks instead of perplexity: comma-separated "
                   "task names (llmtrain_cloze, llmtrain_next_verse offline) or paths to task YAMLs "
                   "(needs `pip install -e .[eval]`)")
    p.add_argument("--limit", type=int, default=None, help="--tasks: at most this many documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples per prompt")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="--tasks: bootstrap samples for stderrs")
    p.add_argument("--output", default="eval_results.json", help="--tasks: where the results JSON goes")
    p.set_defaults(fn=cmd_eval)
