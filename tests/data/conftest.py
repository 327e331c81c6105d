"""Small prepared datasets made on the fly: a tiny BPE tokenizer over deterministic pseudo-English."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `from helpers import ...` as in tests/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from datahelpers import ...`

from datahelpers import make_docs, prepare  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from llmtrain.data.tokenizer import train_tokenizer

    return train_tokenizer(make_docs(200, seed=99), "bpe", 300)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("ds") / "a"
    prepare(tiny_tokenizer, out, make_docs(400, seed=1))
    return out
