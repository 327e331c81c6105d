"""Small prepared datasets made on the fly: a tiny BPE tokenizer over deterministic pseudo-English."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `from helpers import ...` as in tests/

WORDS = ("the of and to in that he shall unto for his i a lord they be is him not them it with all thou "
         "thy was god which my me said but ye their have will thee from as are when this out were by").split()


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        docs.append(" ".join(words).capitalize() + ".")
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from llmtrain.data.tokenizer import train_tokenizer

    return train_tokenizer(make_docs(200, seed=99), "bpe", 300)


def prepare(tok, out: Path, docs: list[str], **kw):
    from llmtrain.data.prepare import write_dataset

    kw.setdefault("val_fraction", 0.1)
    kw.setdefault("shard_tokens", 3000)
    return write_dataset(docs, tok, out, source={"test": str(out)}, progress=False, **kw)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("ds") / "a"
    prepare(tiny_tokenizer, out, make_docs(400, seed=1))
    return out
