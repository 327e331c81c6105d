"""MFU arithmetic against a hand computation (PaLM appendix B)."""

import pytest
import torch
from helpers import ROOT

from llmtrain.config import load_config
from llmtrain.models import build_model
from llmtrain.train.flops import peak_flops
from llmtrain.train.trainer import build_throughput


def test_gpt_125m_flops_and_mfu_by_hand():
    cfg = load_config(None, ["model.name=gpt_125m", "train.seq_len=2048"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    tp = build_throughput(cfg, model, torch.device("cpu"), world_size=1)
    L, d, T, V = 12, 768, 2048, 50304
    n_matmul = L * (12 * d * d + 13 * d) + V * d + 2 * d  # blocks + tied embedding/head + final norm
    assert n_matmul == 123_689_472
    assert tp.model_flops_per_token == 6 * n_matmul + 12 * L * d * T == 968_629_248
    assert tp.peak is None
    rec = tp.record(tokens_per_s=100_000.0)
    assert rec["mfu"] is None  # on CPU: null, never invented
    assert rec["tflops_per_device"] == pytest.approx(96.8629248)
    h100 = type(tp)(tp.model_flops_per_token, tp.hw_flops_per_token, peak_flops("NVIDIA H100 80GB HBM3"), 2)
    assert h100.record(200_000.0)["mfu"] == pytest.approx(100_000 * 968_629_248 / 989e12)


@pytest.mark.parametrize("mode, every_n, blocks_redone", [("full", 2, 12), ("every_n", 5, 3), ("every_n", 4, 3)])
def test_hfu_counts_the_recomputed_blocks_by_hand(mode, every_n, blocks_redone):
    """Recompute = one more forward of each checkpointed block (its matmuls + attention core); the
    embedding and the output head are not recomputed. every_n wraps blocks 0, n, 2n, ... (12 layers)."""
    cfg = load_config(
        None,
        [
            "model.name=gpt_125m",
            "train.seq_len=2048",
            f"parallel.activation_checkpointing={mode}",
            f"parallel.checkpoint_every_n={every_n}",
        ],
    )
    with torch.device("meta"):
        model = build_model(cfg.model)
    tp = build_throughput(cfg, model, torch.device("cpu"), 1)
    d, T = 768, 2048
    block_fwd = 2 * (12 * d * d + 13 * d) + 4 * d * T
    assert tp.hw_flops_per_token - tp.model_flops_per_token == blocks_redone * block_fwd
    assert tp.record(1000.0)["hfu"] is None  # CPU: no peak, but the field is there
    selective = load_config(
        None, ["model.name=gpt_125m", "train.seq_len=2048", "parallel.activation_checkpointing=selective"]
    )
    tp = build_throughput(selective, model, torch.device("cpu"), 1)
    assert tp.hw_flops_per_token - tp.model_flops_per_token == 12 * 4 * d * T


def test_peak_table():
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops(None) is None and peak_flops("Some Future GPU") is None


def test_untied_embedding_is_a_lookup_not_a_matmul():
    """llama_1b (TinyLlama shape) has an untied head: only the head multiplies, the embedding is looked up."""
    cfg = load_config(None, ["model.name=llama_1b", "train.seq_len=2048"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    tp = build_throughput(cfg, model, torch.device("cpu"), world_size=1)
    n, V, d = 1_100_048_384, 32000, 2048
    assert sum(p.numel() for p in model.parameters()) == n
    assert tp.model_flops_per_token == 6 * (n - V * d) + 12 * 22 * d * 2048


def test_bert_masked_lm_head_counts_only_masked_positions():
    """BERT's MLM head (dense + decoder tied to wte) runs on the ~15% masked positions, not every token;
    the pooler and NSP head once per sequence."""
    cfg = load_config(ROOT / "recipes" / "bert_base.yaml", ["train.seq_len=512"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    tp = build_throughput(cfg, model, torch.device("cpu"), world_size=1)
    L, d, T, V, p = 12, 768, 512, cfg.model.vocab_size, cfg.data.mlm_prob
    blocks = L * (12 * d * d + 13 * d)
    rest = d * d + d + 2 * d + 2 * d + 2 * d + 2  # pooler, embedding norm, head norm, nsp head
    head = d * d + V * d  # mlm_dense + tied decoder
    dense_bias = d  # mlm_dense.bias is a per-token add, counted with the params as PaLM does
    n_all = blocks + rest + head + dense_bias + V  # + the decoder bias
    per_seq = d * d + d + 2 * d + 2  # pooler + nsp head, on [CLS] only
    assert tp.model_flops_per_token == pytest.approx(
        6 * (n_all - (1 - p) * head - (1 - 1 / T) * per_seq) + 12 * L * d * T, abs=6
    )
