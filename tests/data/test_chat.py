"""Chat and preference data (llmtrain/data/chat.py): the template renders as transformers' apply_chat_template,
only assistant tokens are targets (exactly zero gradient elsewhere), packing keeps conversations apart, what
cannot be rendered or is too long is counted, bad input is one line with exit 2."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from datahelpers import WORDS
from test_data_cli_errors import one_error_line

from llmtrain.cli import main as llmtrain_main
from llmtrain.data import DataConfig, build_data
from llmtrain.data.chat import CHATML, ChatTemplate, encode_chat, load_chat_template, write_chat_dataset
from llmtrain.errors import DataError

T = 128


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": _text(rng, 2, 5)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 2)):
            msgs += [{"role": "user", "content": _text(rng, 2, 6)}, {"role": "assistant", "content": _text(rng, 1, 6)}]
        out.append({"messages": msgs})
    return out


@pytest.fixture(scope="module")
def chat_tok(tiny_tokenizer):
    """The tiny BPE with ChatML's turn markers as special tokens."""
    from datahelpers import make_docs

    from llmtrain.data.tokenizer import Tokenizer, train_tokenizer

    tok = train_tokenizer(make_docs(200, seed=99), "bpe", 300, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok.hf, "<chat test>")


def tiny_llama(vocab_size: int) -> torch.nn.Module:
    from llmtrain.models import ModelConfig, apply_model_preset, build_model

    keys = dict(name="llama_debug", n_layer=1, n_embd=32, n_head=2, n_kv_head=1, vocab_size=vocab_size, block_size=T)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**apply_model_preset({"model": keys})["model"]))
    model.init_weights()
    return model


def chatml() -> ChatTemplate:
    return load_chat_template("/nonexistent", "chatml")


def prepare(tmp_path, tok, records, name="d", **kw):
    kw.setdefault("seq_len", T)
    out = tmp_path / name
    jsonl = tmp_path / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    from llmtrain.data.chat import iter_records

    m, stats = write_chat_dataset(
        iter_records(str(jsonl)), tok, kw.pop("template", chatml()), out, label=str(jsonl), **kw
    )
    return out, m, stats


def test_rendering_equals_transformers_apply_chat_template(chat_tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=chat_tok.hf, chat_template=CHATML, eos_token="<|im_end|>")
    t = chatml()
    for rec in conversations(20, seed=3):
        ids, mask = encode_chat(rec["messages"], t, chat_tok)
        assert t.render(rec["messages"]) == hf.apply_chat_template(rec["messages"], tokenize=False)
        theirs = hf.apply_chat_template(rec["messages"], tokenize=True)
        theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
        assert ids.tolist() == list(theirs)
        # the trained tokens are exactly the assistant replies with their end-of-turn marker
        replies = [m["content"] + "<|im_end|>\n" for m in rec["messages"] if m["role"] == "assistant"]
        assert chat_tok.decode(ids[mask == 1].tolist()) == "".join(replies)
        _, last = encode_chat(rec["messages"], t, chat_tok, train_on="last-assistant")
        assert chat_tok.decode(ids[last == 1].tolist()) == replies[-1]
        _, every = encode_chat(rec["messages"], t, chat_tok, train_on="all")
        assert every.all()


def test_smollm2_imported_template_equals_transformers(tmp_path):
    """SmolLM2-135M-Instruct's own template, from its GGUF file as `llmtrain import-hf` stores it."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from llmtrain.data.tokenizer import Tokenizer
    from llmtrain.interop.gguf import read_gguf_tokenizer
    from llmtrain.interop.pretrained import smollm2_gguf

    hf_tok, cfg = read_gguf_tokenizer(smollm2_gguf())
    assert "<|im_start|>" in cfg["chat_template"] and cfg["eos_token"] == "<|im_end|>"
    d = tmp_path / "tokenizer"
    d.mkdir()
    hf_tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok, ref = Tokenizer(hf_tok, str(d / "tokenizer.json")), AutoTokenizer.from_pretrained(str(d))
    t = load_chat_template(d)
    assert t.end_of_turn == "<|im_end|>"
    for rec in conversations(10, seed=5):
        for gen in (False, True):
            msgs = rec["messages"][:-1] if gen else rec["messages"]
            assert t.render(msgs, gen) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        ids, _ = encode_chat(rec["messages"], t, tok)
        theirs = ref.apply_chat_template(rec["messages"], tokenize=True)
        assert ids.tolist() == list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)


def test_labels_only_on_assistant_tokens_and_masked_logits_get_exactly_zero_gradient(tmp_path, chat_tok):
    out, m, stats = prepare(tmp_path, chat_tok, conversations(60), val_fraction=0.1)
    assert m["kind"] == "chat" and m["loss_mask"] and m["version"] == 2 and stats.examples == 60
    data = build_data(
        DataConfig(path=str(out), doc_mask=True),
        seq_len=T,
        seed=0,
        micro_batch_size=4,
        grad_accum=1,
        dp_rank=0,
        dp_size=1,
    )
    b = data.train_batches(0)[0]
    x, labels = b["input_ids"], b["labels"]
    im_start, im_end = chat_tok.hf.token_to_id("<|im_start|>"), chat_tok.hf.token_to_id("<|im_end|>")
    assert (x[:, 0] == im_start).all()  # every window starts with a conversation
    targets = labels[labels != -100]
    assert 0 < len(targets) < labels.numel() // 2 and (targets == im_end).any()
    replies = {m["content"] for r in conversations(60) for m in r["messages"] if m["role"] == "assistant"}
    for row in range(len(x)):  # the trained tokens are whole assistant replies, each ending at its <|im_end|>\n
        pieces = chat_tok.decode(labels[row][labels[row] != -100].tolist()).split("<|im_end|>\n")
        assert pieces[-1] == "" and all(p in replies for p in pieces[:-1])
    # exactly zero gradient at every masked position, nonzero at trained ones
    model = tiny_llama(chat_tok.vocab_size)
    logits = model(x, position_ids=b["position_ids"], doc_ids=b["doc_ids"])
    logits.retain_grad()
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    g = logits.grad.abs().sum(-1)
    assert (g[labels == -100] == 0).all() and (g[labels != -100] > 0).all()


def test_packing_keeps_conversations_whole_and_apart(tmp_path, chat_tok):
    out, _, _ = prepare(tmp_path, chat_tok, conversations(40, seed=1), val_fraction=0.0)
    data = build_data(
        DataConfig(path=str(out), doc_mask=True),
        seq_len=T,
        seed=0,
        micro_batch_size=8,
        grad_accum=1,
        dp_rank=0,
        dp_size=1,
    )
    b = data.train_batches(0)[0]
    eos = chat_tok.eos_id
    model = tiny_llama(chat_tok.vocab_size)
    model.eval()
    with torch.no_grad():
        packed = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
        for row in range(len(b["input_ids"])):
            x, docs = b["input_ids"][row], b["doc_ids"][row]
            # each conversation starts at position 0 and ends with EOS inside the window: never cut
            starts = torch.nonzero(torch.diff(docs, prepend=docs[:1] - 1)).flatten()
            assert (b["position_ids"][row][starts] == 0).all()
            for a in starts.tolist():
                d = docs == docs[a]
                conv = x[d]
                if conv[0] == eos:
                    continue  # padding
                assert conv[-1] == eos and (conv[:-1] != eos).all()
                alone = model(conv[None])[0]  # the conversation by itself gives the same logits
                torch.testing.assert_close(packed[row][d], alone, rtol=1e-5, atol=1e-5)


def test_overlong_and_unrenderable_are_counted_never_trained(tmp_path, chat_tok):
    recs = conversations(30, seed=2)
    long_reply = " ".join(["the lord"] * 60)
    recs[3] = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": long_reply}]}
    # a template that refuses a system message (as some do): those records cannot be rendered
    strict = ChatTemplate(
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "strict",
    )
    n_system = sum(r["messages"][0]["role"] == "system" for r in recs)
    assert n_system > 0
    _, m, stats = prepare(tmp_path, chat_tok, recs, "drop", template=strict)
    assert stats.unrenderable == n_system and stats.overlong_dropped == 1 and stats.truncated == 0
    assert stats.examples == 30 - n_system - 1 and m["chat"]["overlong_dropped"] == 1
    _, _, stats = prepare(tmp_path, chat_tok, recs, "cut", overlong="truncate")
    assert stats.truncated == 1 and stats.overlong_dropped == 0 and stats.examples == 30
    # a reply that starts only past seq_len leaves nothing to train: dropped even with truncate
    recs[3] = {"messages": [{"role": "user", "content": long_reply}, {"role": "assistant", "content": "Yes."}]}
    _, _, stats = prepare(tmp_path, chat_tok, recs, "cut2", overlong="truncate")
    assert stats.truncated == 0 and stats.overlong_dropped == 1


def test_preference_batches(tmp_path, chat_tok):
    recs = [
        {"prompt": "Who said it?", "chosen": "The lord.", "rejected": "He said."},
        {
            "prompt": [{"role": "user", "content": "Say it."}],
            "chosen": {"role": "assistant", "content": "It."},
            "rejected": [{"role": "assistant", "content": "No, not it."}],
        },
        {
            "chosen": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Thou art."}],
            "rejected": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Go."}],
        },
    ]
    out, m, stats = prepare(tmp_path, chat_tok, recs, "p", kind="preference", seq_len=48)
    assert m["kind"] == "preference" and stats.examples == 3
    data = build_data(
        DataConfig(path=str(out)), seq_len=48, seed=0, micro_batch_size=3, grad_accum=1, dp_rank=0, dp_size=1
    )
    b = data.train_batches(0)[0]
    assert set(b) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    assert all(v.shape == (3, 48) for v in b.values())
    got = set()
    for i in range(3):
        c, r = (
            chat_tok.decode(b[f"{s}_labels"][i][b[f"{s}_labels"][i] != -100].tolist()) for s in ("chosen", "rejected")
        )
        got.add((c, r))
        # the prompt is identical on both sides and never a target
        n = int((b["chosen_labels"][i] != -100).nonzero()[0])
        assert torch.equal(b["chosen_input_ids"][i][:n], b["rejected_input_ids"][i][:n])
    assert got == {
        ("The lord.<|im_end|>\n", "He said.<|im_end|>\n"),
        ("It.<|im_end|>\n", "No, not it.<|im_end|>\n"),
        ("Thou art.<|im_end|>\n", "Go.<|im_end|>\n"),
    }
    from llmtrain.data.chat import preference_pair

    differ = {"chosen": recs[2]["chosen"], "rejected": [{"role": "user", "content": "Ho."}, recs[2]["rejected"][1]]}
    with pytest.raises(DataError, match="same conversation up to their last turn"):
        preference_pair(differ, "r")


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"messages": [{"role": "user", "content": "Hi."}]}, "no assistant turn"),
        (
            {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "unknown role 'tool'",
        ),
        ({"text": "plain"}, "no 'messages' field"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, chat_tok, capsys, record, needle):
    chat_tok.save(tmp_path / "tok")
    (tmp_path / "c.jsonl").write_text(json.dumps(conversations(1)[0]) + "\n" + json.dumps(record) + "\n")
    args = [
        "prepare-data",
        "--format",
        "chat",
        "--input",
        str(tmp_path / "c.jsonl"),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--out",
        str(tmp_path / "o"),
        "--seq-len",
        "64",
        "--chat-template",
        "chatml",
    ]
    assert llmtrain_main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert needle in line and "c.jsonl record 1" in line


def test_missing_template_is_one_line_exit_2(tmp_path, chat_tok, capsys):
    chat_tok.save(tmp_path / "tok")
    (tmp_path / "c.jsonl").write_text(json.dumps(conversations(1)[0]) + "\n")
    args = [
        "prepare-data",
        "--format",
        "chat",
        "--input",
        str(tmp_path / "c.jsonl"),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--out",
        str(tmp_path / "o"),
        "--seq-len",
        "64",
    ]
    assert llmtrain_main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no chat template" in line and "--chat-template chatml" in line
    with pytest.raises(DataError, match="seq_len"):  # data cut for another train.seq_len is refused
        out, _, _ = prepare(tmp_path, chat_tok, conversations(20), "s")
        build_data(
            DataConfig(path=str(out)), seq_len=2 * T, seed=0, micro_batch_size=1, grad_accum=1, dp_rank=0, dp_size=1
        )


def test_verify_checks_the_mask(tmp_path, chat_tok, capsys):
    out, _, _ = prepare(tmp_path, chat_tok, conversations(20), "v")
    assert llmtrain_main(["verify", str(out), "--no-progress"]) == 0
    mask = out / "train_00000.mask"
    raw = bytearray(mask.read_bytes())
    raw[40] = 7
    mask.write_bytes(bytes(raw))
    assert llmtrain_main(["verify", str(out), "--no-progress"]) == 2
    assert "train_00000.mask" in one_error_line(capsys.readouterr().err)


def test_parquet_input_gives_the_same_dataset_as_jsonl(tmp_path, chat_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmtrain.data.chat import iter_records

    recs = conversations(30, seed=4)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "c.parquet")
    _, from_jsonl, _ = prepare(tmp_path, chat_tok, recs, "j")
    from_parquet, _ = write_chat_dataset(
        iter_records(str(tmp_path / "c.parquet")), chat_tok, chatml(), tmp_path / "pq", seq_len=T
    )
    assert from_parquet["checksums"]["files"] == from_jsonl["checksums"]["files"]


def test_rerun_after_interruption_removes_only_its_own_shards(tmp_path, chat_tok):
    out = tmp_path / "o"
    out.mkdir()
    (out / "train_00000.bin").write_bytes(b"half-written")  # an interrupted run's shard
    (out / "train_chat.jsonl").write_text("the user's input\n")  # not ours: kept
    recs = conversations(10)
    from llmtrain.data.chat import iter_records

    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    write_chat_dataset(iter_records(str(tmp_path / "c.jsonl")), chat_tok, chatml(), out, seq_len=T)
    assert (out / "train_chat.jsonl").read_text() == "the user's input\n"
    assert llmtrain_main(["verify", str(out), "--no-progress"]) == 0
