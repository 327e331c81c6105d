"""tests/evaluation: the lm-eval backend, `llmtrain eval --tasks`, the offline tasks, `train.eval_tasks`.

Tests that need lm-evaluation-harness (the `eval` extra, in `dev`: CI installs it) fail with the install
line when it is missing; they are not skipped."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `from helpers import ...` as in tests/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from evalhelpers import ...` (not from conftest:
# another directory's conftest module can shadow this one when the whole suite runs)


@pytest.fixture(scope="session")
def tokenizer():
    from llmtrain.data import DataConfig, load_tokenizer
    from llmtrain.data.bundled import bundled_tokenizer_dir

    return load_tokenizer(bundled_tokenizer_dir(DataConfig()))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random GPT-2-flavour decoder with the bundled tokenizer, as an llmtrain model directory."""
    import torch

    from llmtrain.interop.hf import write_model_dir
    from llmtrain.models import ModelConfig, build_model

    cfg = ModelConfig(name="gpt_debug", n_layer=2, n_head=2, n_embd=32, vocab_size=tokenizer.vocab_size, block_size=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    from llmtrain.data import DataConfig
    from llmtrain.data.bundled import bundled_tokenizer_dir

    return write_model_dir(
        cfg,
        model.state_dict(),
        tmp_path_factory.mktemp("evalmodel") / "model",
        bundled_tokenizer_dir(DataConfig()) / "tokenizer.json",
    )


LOCAL_DOCS = [
    {
        "context": "In the beginning God created the heaven and the",
        "target": "earth",
        "choices": ["earth.", "sea of glass.", "LORD of hosts.", "king."],
        "gold": 0,
    },
    {
        "context": "And God said, Let there be",
        "target": "light",
        "choices": ["a famine.", "light: and there was light.", "war.", "nothing."],
        "gold": 1,
    },
    {
        "context": "The LORD is my shepherd; I shall not",
        "target": "want",
        "choices": ["fear.", "sleep.", "want.", "go."],
        "gold": 2,
    },
    {
        "context": "To be, or not to be, that is the",
        "target": "question",
        "choices": ["sword.", "crown.", "answer.", "question:"],
        "gold": 3,
    },
    {
        "context": "Blessed are the meek: for they shall inherit the",
        "target": "earth",
        "choices": ["earth.", "wind.", "kingdom of heaven and all the glory thereof.", "sea."],
        "gold": 0,
    },
]


@pytest.fixture(scope="session")
def local_tasks(tmp_path_factory):
    """A folder of two task YAMLs (choice and cloze) over five local documents: what `--tasks PATH` reads."""
    import json

    root = tmp_path_factory.mktemp("localtasks")
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in LOCAL_DOCS))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\ntest_split: test\n"
    (root / "local_choice.yaml").write_text(
        "task: local_choice\n" + data + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (root / "local_cloze.yaml").write_text(
        "task: local_cloze\n" + data + "output_type: loglikelihood\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: \"{{' ' + target}}\"\nmetric_list:\n  - metric: acc\n  - metric: perplexity\n"
    )
    return root
