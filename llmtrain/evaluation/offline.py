"""The offline task suite: two lm-eval tasks built from held-out chapters of the bundled corpus.

- `llmtrain_cloze` (LAMBADA-style): a verse with its last word removed, after the two verses before it;
  the model must give that word (acc = the word is the greedy continuation, plus its perplexity).
- `llmtrain_next_verse` (HellaSwag-style): a verse, then four candidate next verses: the real one and
  three of similar length from other held-out chapters (acc and length-normalised acc_norm; chance 0.25).

Only chapters that the bundled split holds out (`data.val_fraction` 0.02, the default, or larger: the split
is a hash threshold, so a larger fraction holds out a superset) are used, so a model trained on the bundled
corpus never saw a passage, and the bundled tokenizer was never trained on one. The data files are
committed beside the YAMLs (a few dozen KB, deterministic) so the tasks work without the corpus cache;
`python -m llmtrain.evaluation.offline` regenerates them and `--check` verifies the committed copies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "tasks"
HELD_OUT_FRACTION = 0.02  # DataConfig.val_fraction's default
PER_CHAPTER = 4  # items per held-out chapter and task: 144 per task
_WORD = re.compile(r"^(.*\s)([A-Za-z][A-Za-z']{2,})([^A-Za-z']*)$", re.S)


def held_out_chapters(cache_dir: str = "") -> list[tuple[str, list[str]]]:
    """(name, verses) of every Bible chapter of the bundled corpus held out at HELD_OUT_FRACTION."""
    import numpy as np

    from llmtrain.data.bundled import cache_root
    from llmtrain.data.corpus import KJV, fetch, kjv_chapters
    from llmtrain.data.prepare import is_val

    chapters = list(kjv_chapters(fetch(KJV, cache_root(cache_dir) / "downloads")))  # bundled docs 0..N-1
    val = is_val(np.arange(len(chapters)), HELD_OUT_FRACTION, 0)
    return [(name, text.split("\n\n", 1)[1].strip().split("\n")) for (name, text), v in zip(chapters, val) if v]


def _hash(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def _spread(candidates: list[int], k: int) -> list[int]:
    """k indices spread evenly over `candidates` (all of them when there are at most k)."""
    if len(candidates) <= k:
        return candidates
    return [candidates[round(i * (len(candidates) - 1) / (k - 1))] for i in range(k)]


def cloze_docs(chapters: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    docs = []
    for name, verses in chapters:
        ok = [j for j in range(2, len(verses)) if len(verses[j].split()) >= 8 and _WORD.match(verses[j])]
        for j in _spread(ok, PER_CHAPTER):
            head, word, _ = _WORD.match(verses[j]).groups()  # type: ignore[union-attr]
            docs.append(
                {"source": f"{name}:{j + 1}", "context": "\n".join(verses[j - 2 : j] + [head.rstrip()]), "target": word}
            )
    return docs


def next_verse_docs(chapters: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    pool = [(name, v) for name, verses in chapters for v in verses]
    docs = []
    for name, verses in chapters:
        for j in _spread(list(range(1, len(verses))), PER_CHAPTER):
            real = verses[j]
            others = sorted((abs(len(v) - len(real)), _hash(name, j, v), v) for n, v in pool if n != name)
            choices = [v for _, _, v in others[:3]]
            gold = _hash("gold", name, j) % 4
            choices.insert(gold, real)
            docs.append({"source": f"{name}:{j + 1}", "context": verses[j - 1], "choices": choices, "gold": gold})
    return docs


def render(cache_dir: str = "") -> dict[str, str]:
    """{file name: JSONL text} of both tasks' data."""
    chapters = held_out_chapters(cache_dir)
    out = {}
    for fname, docs in (("cloze.jsonl", cloze_docs(chapters)), ("next_verse.jsonl", next_verse_docs(chapters))):
        out[fname] = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmtrain.evaluation.offline", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(TASKS_DIR), help="folder for the JSONL files (default: the package's)")
    p.add_argument("--check", action="store_true", help="only compare with the files in --out; exit 1 on a difference")
    args = p.parse_args(argv)
    stale = []
    for fname, text in render().items():
        path = Path(args.out) / fname
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"{path}: {text.count(chr(10))} docs")
    if stale:
        print(
            f"out of date: {', '.join(stale)}; regenerate with python -m llmtrain.evaluation.offline", file=sys.stderr
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
