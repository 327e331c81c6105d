"""data.doc_mask reaches the model: a packed window gives each document the logits it gets on its own."""

from __future__ import annotations

import pytest
import torch

from llmtrain.models import ModelConfig, build_model


def tiny_gpt(pos: str) -> torch.nn.Module:
    extra = dict(norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False) if pos == "rope" else {}
    cfg = ModelConfig(arch="gpt", n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32, dropout=0.0,
                      pos=pos, **extra)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_packed_documents_match_separate_forwards(pos):
    model = tiny_gpt(pos)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 64, (n,), generator=g) for n in (5, 9, 6)]
    packed = torch.cat(docs)[None]  # (1, 20)
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        got = model(packed, position_ids=position_ids, doc_ids=doc_ids)[0]
        want = torch.cat([model(d[None])[0] for d in docs])
        unmasked = model(packed)[0]
    # float32 on CPU; the masked and the separate runs reduce over the same keys in the same order
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[5:], want[5:], atol=1e-3)  # without the mask, documents mix
