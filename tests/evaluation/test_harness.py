"""The lm-eval backend against direct computation: loglikelihoods equal a forward of the same tokens,
rolling loglikelihood equals `llmtrain eval`'s perplexity sum, generation equals `generate`, and
lm-eval's own `hf` backend on the exported weights gives the same numbers and accuracies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from evalhelpers import need_lm_eval

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
    "said, Let there be light: and there was light. And God saw the light, that it was good: and God divided "
    "the light from the darkness. And God called the light Day, and the darkness he called Night."
)


@pytest.fixture(scope="module")
def lm(model_dir):
    need_lm_eval()
    from llmtrain.evaluation.harness import LlmtrainLM

    return LlmtrainLM.from_checkpoint(str(model_dir), "cpu", batch_size=3)


def _instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def _direct(model, ids: list[int], n_ctx: int, window: int) -> tuple[float, bool]:
    """log p(ids[n_ctx:] | ids[:n_ctx]) from one forward of the last window + 1 tokens."""
    whole = ids[-(window + 1) :]
    n = len(ids) - n_ctx
    logp = F.log_softmax(model(torch.tensor([whole[:-1]])).float(), -1)[0, -n:]
    target = torch.tensor(whole[-n:])
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


PAIRS = [
    ("And God said, Let there be", " light"),
    ("The LORD is my", " shepherd; I shall not want."),
    ("", "In the beginning"),
    (TEXT, " Amen."),
]  # empty context: scored after EOS; TEXT > the window


def test_loglikelihood_equals_a_direct_forward(lm, tokenizer):
    got = lm.loglikelihood(_instances("loglikelihood", PAIRS))
    model, eos = lm.model, tokenizer.eos_id
    for (ctx, cont), (ll, greedy) in zip(PAIRS, got):
        ids = [eos, *tokenizer.encode(cont)] if not ctx else tokenizer.encode(ctx + cont)
        n_ctx = 1 if not ctx else len(tokenizer.encode(ctx))
        want_ll, want_greedy = _direct(model, ids, n_ctx, lm.max_length)
        assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
    assert len(tokenizer.encode(TEXT)) > lm.max_length  # the long case really was cut to the window
    lm.batch_size = 1  # batching (padding, sorting) changes nothing
    try:
        assert [ll for ll, _ in lm.loglikelihood(_instances("loglikelihood", PAIRS))] == pytest.approx(
            [ll for ll, _ in got], abs=1e-4
        )
    finally:
        lm.batch_size = 3


def test_rolling_loglikelihood_equals_eval_perplexity(lm, tokenizer):
    """`llmtrain eval` scores windows of the token stream (a document follows the previous one's EOS) with
    perplexity_on; on a text of whole windows, rolling loglikelihood is minus the same sum."""
    from llmtrain.inference import perplexity_on

    T = lm.max_length
    tokens = tokenizer.encode(TEXT * 3)[: 4 * T]
    text = tokenizer.decode(tokens)
    assert tokenizer.encode(text) == tokens
    stream = torch.tensor([tokenizer.eos_id, *tokens])
    windows = [
        {"input_ids": stream[i : i + T][None], "labels": stream[i + 1 : i + T + 1][None]} for i in range(0, 4 * T, T)
    ]
    batches = [{k: torch.cat([w[k] for w in windows[j : j + 2]]) for k in windows[0]} for j in (0, 2)]
    loss, count = perplexity_on(lm.model, batches, "cpu")
    assert count == 4 * T
    (rolling,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    assert rolling == pytest.approx(-loss * count, rel=1e-5)


def test_generate_until_equals_greedy_generate_with_the_kv_cache(lm, tokenizer):
    from llmtrain.models.generation import generate

    prompts = ["And God said", "And God made", "The LORD is my shepherd"]  # the first two: one batch
    assert len(tokenizer.encode(prompts[0])) == len(tokenizer.encode(prompts[1]))
    got = lm.generate_until(
        _instances("generate_until", [(p, {"until": ["\n\n"], "max_gen_toks": 6}) for p in prompts])
    )
    for p, text in zip(prompts, got):
        ids = torch.tensor([tokenizer.encode(p)])
        out = generate(lm.model, ids, 6, lm.max_length, temperature=0)[0, ids.size(1) :].tolist()
        want = tokenizer.decode(out[: out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out)
        assert text == want.split("\n\n")[0]
    # a stop string ends generation: the text up to it, without it
    first = got[0]
    if len(first) > 2:
        stop = first[1:3]
        (cut,) = lm.generate_until(_instances("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 6})]))
        assert cut == first.split(stop)[0]


def test_same_accuracies_as_lm_evals_hf_backend(lm, model_dir, local_tasks, tmp_path):
    """export-hf the same weights and run lm-eval's `hf` backend on the local tasks: equal per-request
    loglikelihoods (logit parity) and so equal accuracies."""
    from lm_eval.models.huggingface import HFLM

    from llmtrain.evaluation.run import evaluate_tasks, flat_metrics
    from llmtrain.interop.hf import export_hf

    hf = HFLM(pretrained=str(export_hf(model_dir, tmp_path / "hf")), device="cpu", batch_size=3, dtype="float32")
    reqs = _instances("loglikelihood", PAIRS[:3])
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs), hf.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    ours = flat_metrics(evaluate_tasks(lm, str(local_tasks)))
    theirs = flat_metrics(evaluate_tasks(hf, str(local_tasks)))
    assert set(ours) >= {"local_choice_acc", "local_choice_acc_norm", "local_cloze_acc", "local_cloze_perplexity"}
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key


def test_evaluate_tasks_leaves_the_global_rng_alone(lm, local_tasks):
    """lm-eval seeds Python, numpy and torch; a run that scores train.eval_tasks must continue its own streams."""
    import random

    import numpy as np

    from llmtrain.evaluation.run import evaluate_tasks

    def draw() -> tuple[float, float, float]:
        return torch.rand(1).item(), random.random(), float(np.random.rand())

    def seed() -> None:
        torch.manual_seed(5), random.seed(5), np.random.seed(5)

    seed()
    evaluate_tasks(lm, str(local_tasks / "local_cloze.yaml"), limit=2)
    after = draw()
    seed()
    assert after == draw()
