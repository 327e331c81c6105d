"""A tiny chat fine-tuning run end to end: prepare-data --format chat, the trainer (recipes/sft_llama_debug.yaml
with the tiny test model, from scratch), and `llmtrain generate RUN --chat` through the data's template."""

from __future__ import annotations

import io
import json
import random

from datahelpers import WORDS
from helpers import losses, train

from llmtrain.cli import main as llmtrain_main

REPLY = "Amen."


def test_tiny_sft_run_loss_falls_and_generate_chat_answers(tmp_path, capsys, monkeypatch):
    from datahelpers import make_docs

    from llmtrain.data.tokenizer import train_tokenizer

    tok = train_tokenizer(make_docs(200, seed=99), "bpe", 300, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    rng = random.Random(0)
    with open(tmp_path / "chat.jsonl", "w") as f:
        for _ in range(400):  # whatever the user says, the assistant answers REPLY: learnable in a few steps
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))).capitalize() + "?"
            f.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": REPLY}]}
                )
                + "\n"
            )
    tok.save(tmp_path / "tok")
    data = tmp_path / "data"
    rc = llmtrain_main(
        [
            "prepare-data",
            "--format",
            "chat",
            "--input",
            str(tmp_path / "chat.jsonl"),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--chat-template",
            "chatml",
            "--seq-len",
            "64",
            "--val-fraction",
            "0.1",
            "--out",
            str(data),
        ]
    )
    assert rc == 0
    out = tmp_path / "run"
    train(
        out,
        f"data.path={data}",
        "model.init_from=null",
        "train.max_steps=40",
        "optim.lr=3e-3",
        recipe="recipes/sft_llama_debug.yaml",
    )
    loss = losses(out)
    assert loss[40] < 0.3 * loss[1], loss  # only the reply (and its end-of-turn) is a target: near zero at the end
    capsys.readouterr()
    rc = llmtrain_main(
        [
            "generate",
            str(out),
            "--chat",
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
            "--prompt",
            "Who shall inherit the earth?",
        ]
    )
    assert rc == 0 and capsys.readouterr().out.strip() == REPLY
    # a conversation read from stdin (not a terminal): one reply per line, the history kept, an empty line ends it
    monkeypatch.setattr("sys.stdin", io.StringIO("Who shall inherit the earth?\nAnd the kingdom?\n\n"))
    assert llmtrain_main(["generate", str(out), "--chat", "--temperature", "0", "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.split("\n") == [REPLY, REPLY, ""]
    # the exported tokenizer carries the template: transformers' apply_chat_template renders as we do
    from transformers import AutoTokenizer

    assert llmtrain_main(["export-hf", str(out), str(tmp_path / "hf")]) == 0
    msgs = [{"role": "user", "content": "Who?"}]
    rendered = AutoTokenizer.from_pretrained(str(tmp_path / "hf")).apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    # ... and import-hf keeps it: the imported model talks through it and stops at ChatML's end of turn
    assert llmtrain_main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    capsys.readouterr()
    args = ["generate", str(tmp_path / "imported"), "--chat", "--temperature", "0", "--prompt", "Who shall live?"]
    assert llmtrain_main([*args, "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.strip() == REPLY
