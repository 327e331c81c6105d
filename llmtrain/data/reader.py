"""Read documents through HF `datasets` with `streaming=True`, so memory stays flat on any corpus size.

An input is a local file, directory or glob of `.txt` / `.jsonl` / `.json` / `.parquet` / `.csv`
files (optionally `.gz`), or any `datasets` loader name (`load_dataset(name, ...)`). Each record's
`text_field` is one document; for plain text files `sample_by` says what a document is.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrain.errors import DataError

READ_BATCH = 256  # records per column batch read from `datasets` (memory: as many documents)

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _builder_for(files: list[str], spec: str) -> str:
    kinds = set()
    for f in files:
        suffixes = Path(f).suffixes
        ext = (
            suffixes[-2]
            if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst") and len(suffixes) > 1
            else (suffixes[-1] if suffixes else "")
        )
        if ext not in _BUILDERS:
            raise DataError(
                f"{f}: unsupported file type '{ext}'; use .txt, .jsonl, .json, .parquet or .csv "
                f"(optionally compressed), or pass a `datasets` loader name"
            )
        kinds.add(_BUILDERS[ext])
    if len(kinds) != 1:
        raise DataError(
            f"{spec}: mixes file types {sorted(kinds)}; prepare each type separately and blend them with data.sources"
        )
    return kinds.pop()


def local_files(spec: str) -> list[str] | None:
    """The files a local input names (a file, a directory searched recursively, or a glob), else None."""
    p = Path(spec).expanduser()
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return files or None
    matches = sorted(glob.glob(str(p), recursive=True))
    return [m for m in matches if Path(m).is_file()] or None


def open_stream(
    spec: str, *, text_field: str = "text", split: str = "train", name: str | None = None, sample_by: str = "document"
) -> Any:
    """A streaming `datasets.IterableDataset` over the input `spec`."""
    import datasets

    files = local_files(spec)
    if files is not None and not (Path(spec).is_dir() and _is_loader_dir(Path(spec))):
        builder = _builder_for(files, spec)
        _quiet_decode_errors(builder)
        kwargs: dict[str, Any] = {"sample_by": sample_by} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=True, **kwargs)
    if Path(spec).expanduser().exists() and files is None:
        raise DataError(f"{spec}: no input files there; point --input at .txt/.jsonl/.parquet files")
    try:
        return datasets.load_dataset(spec, name, split=split, streaming=True)
    except FileNotFoundError as exc:
        raise DataError(
            f"{spec}: neither a local file/directory/glob nor a `datasets` loader that can be "
            f"reached ({exc}); check the path"
        ) from None


def _quiet_decode_errors(builder: str) -> None:
    """The csv and json builders log a file's UnicodeDecodeError before raising it; we turn the raise into
    one line naming the file and the fix (`_not_utf8`), so their log line would only repeat it."""
    import logging

    log = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")
    if not any(getattr(f, "__name__", "") == "_not_decode_error" for f in log.filters):
        log.addFilter(_not_decode_error)


def _not_decode_error(record: Any) -> bool:
    return "UnicodeDecodeError" not in record.getMessage()


def _is_loader_dir(d: Path) -> bool:
    """A directory holding a loading script is a `datasets` loader, not a folder of data files."""
    return (d / f"{d.name}.py").exists()


@dataclass
class InputStats:
    """Records read, and those that gave no document: the text field missing (or null), or empty text."""

    records: int = 0
    missing: int = 0
    empty: int = 0
    first_missing: str = ""  # "<input> record <i>" of the first record without the field

    def as_dict(self) -> dict[str, int]:
        return {"records": self.records, "missing_text_field": self.missing, "empty_text": self.empty}


def iter_texts(
    spec: str,
    *,
    text_field: str = "text",
    split: str = "train",
    name: str | None = None,
    sample_by: str = "document",
    ds: Any = None,
    stats: InputStats | None = None,
    missing_text: str = "skip",
) -> Iterator[str]:
    """The `text_field` of every record ("" for a record without it, counted in `stats`; a DataError instead
    when `missing_text="error"`); a clear error when the field is absent from every record, not text, or the
    file is not UTF-8."""
    files = local_files(spec) if ds is None else None
    if files and all(Path(f).stat().st_size == 0 for f in files):
        return  # an empty corpus; datasets' json builder would crash inferring its features
    stats = stats if stats is not None else InputStats()
    try:
        yield from _texts(
            spec,
            ds
            if ds is not None
            else open_stream(spec, text_field=text_field, split=split, name=name, sample_by=sample_by),
            text_field,
            stats,
            missing_text,
        )
    except Exception as exc:  # datasets, pyarrow and pandas raise UnicodeDecodeError from deep inside
        cause = _unicode_error(exc)
        if cause is None:
            raise
        raise DataError(_not_utf8(spec, files or [], cause)) from None


def _texts(spec: str, stream: Any, text_field: str, stats: InputStats, missing_text: str) -> Iterator[str]:
    if stream.column_names and text_field in stream.column_names:
        stream = stream.select_columns([text_field])  # other fields are never decoded
    # Column batches, not records: `datasets` spends ~5 us of Python per record it yields one at a time.
    batches = stream.iter(batch_size=READ_BATCH)
    first = next(batches, None)
    if first is None:
        return
    _check_record(first, text_field, spec)
    for batch in itertools.chain([first], batches):
        for value in batch[text_field]:
            stats.records += 1
            if isinstance(value, str) and value:
                yield value
            elif value is None or value == "":
                _count_missing(spec, text_field, stats, value is None, missing_text)
                yield ""
            else:
                raise DataError(
                    f"{spec}: field '{text_field}' holds {type(value).__name__}, not text; pass "
                    "--text-field naming a string field"
                )


def _count_missing(spec: str, text_field: str, stats: InputStats, missing: bool, missing_text: str) -> None:
    if not missing:
        stats.empty += 1
        return
    if missing_text == "error":
        raise DataError(
            f"{spec}: record {stats.records - 1} (0-based) has no '{text_field}' field (or it is null); "
            "fix or drop such records, or leave out --on-missing-text error to skip and count them"
        )
    stats.missing += 1
    stats.first_missing = stats.first_missing or f"{spec} record {stats.records - 1}"


def _unicode_error(exc: BaseException | None) -> UnicodeDecodeError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, UnicodeDecodeError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _not_utf8(spec: str, files: list[str], cause: UnicodeDecodeError) -> str:
    """The message for an input that is not UTF-8: which file, where, and how to convert it."""
    for f in files:
        where = first_invalid_utf8(f)
        if where is not None:
            return (
                f"{f}: not UTF-8 text (invalid byte at offset {where[0]}, line {where[1]}); convert it to UTF-8, "
                f"e.g. `iconv -f cp1252 -t utf-8 {f} > {f}.utf8` (or -f latin1), and pass that file to --input"
            )
    return (
        f"{spec}: not UTF-8 text ({cause.reason}); convert the input to UTF-8 (e.g. `iconv -f cp1252 -t utf-8`) "
        "and run again"
    )


def first_invalid_utf8(path: str) -> tuple[int, int] | None:
    """(byte offset, 1-based line) of the first byte that is not valid UTF-8 in the (decompressed) file."""
    import codecs

    if Path(path).suffix == ".zst":  # no zstd reader in the standard library: the caller names the input
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with _open_maybe_compressed(path) as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk's end
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                at = max(exc.start - pending, 0)
                return offset + at, line + chunk[:at].count(b"\n")
            offset += len(chunk)
            line += chunk.count(b"\n")
    tail = len(decoder.getstate()[0])
    return (offset - tail, line) if tail else None  # the file may end inside a character


def _open_maybe_compressed(path: str) -> Any:
    import bz2
    import gzip
    import lzma

    openers: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    opener = openers.get(Path(path).suffix, open)
    return opener(path, "rb")


def _check_record(record: dict[str, Any], text_field: str, spec: str) -> None:
    """`record`: one record or a batch of them (field -> values); both have the fields as keys."""
    if text_field not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{spec}: its records have no field '{text_field}' (fields: {fields}); pass --text-field with one of them"
        )


def iter_many(specs: Iterable[str], **kw: Any) -> Iterator[str]:
    """`iter_texts` of each input in turn (keyword arguments, `stats` included, shared)."""
    for spec in specs:
        yield from iter_texts(spec, **kw)
