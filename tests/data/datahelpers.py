"""Data-test helpers (a uniquely named module: every tests/*/conftest.py is `conftest` to Python,
so `from conftest import ...` could resolve to another directory's conftest)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the of and to in that he shall unto for his i a lord they be is him not them it with all thou "
    "thy was god which my me said but ye their have will thee from as are when this out were by"
).split()


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        docs.append(" ".join(words).capitalize() + ".")
    return docs


def prepare(tok, out: Path, docs: list[str], **kw):
    from llmtrain.data.prepare import write_dataset

    kw.setdefault("val_fraction", 0.1)
    kw.setdefault("shard_tokens", 3000)
    return write_dataset(docs, tok, out, source={"test": str(out)}, progress=False, **kw)
