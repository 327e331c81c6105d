"""Read documents through HF `datasets` with `streaming=True`, so memory stays flat on any corpus size.

An input is a local file, directory or glob of `.txt` / `.jsonl` / `.json` / `.parquet` / `.csv`
files (optionally `.gz`), or any `datasets` loader name (`load_dataset(name, ...)`). Each record's
`text_field` is one document; for plain text files `sample_by` says what a document is.
"""

from __future__ import annotations

import glob
import itertools
from pathlib import Path
from typing import Any, Iterable, Iterator

from llmtrain.errors import DataError

READ_BATCH = 256  # records per column batch read from `datasets` (memory: as many documents)

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
             ".csv": "csv"}


def _builder_for(files: list[str], spec: str) -> str:
    kinds = set()
    for f in files:
        suffixes = Path(f).suffixes
        ext = suffixes[-2] if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst") and len(suffixes) > 1 else (
            suffixes[-1] if suffixes else "")
        if ext not in _BUILDERS:
            raise DataError(f"{f}: unsupported file type '{ext}'; use .txt, .jsonl, .json, .parquet or .csv "
                             f"(optionally compressed), or pass a `datasets` loader name")
        kinds.add(_BUILDERS[ext])
    if len(kinds) != 1:
        raise DataError(f"{spec}: mixes file types {sorted(kinds)}; prepare each type separately and blend them "
                         "with data.sources")
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


def open_stream(spec: str, *, text_field: str = "text", split: str = "train", name: str | None = None,
                sample_by: str = "document") -> Any:
    """A streaming `datasets.IterableDataset` over the input `spec`."""
    import datasets

    files = local_files(spec)
    if files is not None and not (Path(spec).is_dir() and _is_loader_dir(Path(spec))):
        builder = _builder_for(files, spec)
        kwargs: dict[str, Any] = {"sample_by": sample_by} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=True, **kwargs)
    if Path(spec).expanduser().exists() and files is None:
        raise DataError(f"{spec}: no input files there; point --input at .txt/.jsonl/.parquet files")
    try:
        return datasets.load_dataset(spec, name, split=split, streaming=True)
    except FileNotFoundError as exc:
        raise DataError(f"{spec}: neither a local file/directory/glob nor a `datasets` loader that can be "
                         f"reached ({exc}); check the path") from None


def _is_loader_dir(d: Path) -> bool:
    """A directory holding a loading script is a `datasets` loader, not a folder of data files."""
    return (d / f"{d.name}.py").exists()


def iter_texts(spec: str, *, text_field: str = "text", split: str = "train", name: str | None = None,
               sample_by: str = "document", ds: Any = None) -> Iterator[str]:
    """The `text_field` of every record; a clear error when the field is missing or not a string."""
    files = local_files(spec) if ds is None else None
    if files and all(Path(f).stat().st_size == 0 for f in files):
        return  # an empty corpus; datasets' json builder would crash inferring its features
    stream = ds if ds is not None else open_stream(spec, text_field=text_field, split=split, name=name,
                                                   sample_by=sample_by)
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
            if value is None:
                yield ""
            elif isinstance(value, str):
                yield value
            else:
                raise DataError(f"{spec}: field '{text_field}' holds {type(value).__name__}, not text; pass "
                                 "--text-field naming a string field")


def _check_record(record: dict[str, Any], text_field: str, spec: str) -> None:
    """`record`: one record or a batch of them (field -> values); both have the fields as keys."""
    if text_field not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise DataError(f"{spec}: its records have no field '{text_field}' (fields: {fields}); pass "
                         f"--text-field with one of them")


def iter_many(specs: Iterable[str], **kw: Any) -> Iterator[str]:
    for spec in specs:
        yield from iter_texts(spec, **kw)
