"""The encoder family's spec: what the framework needs to know about `model.arch=bert`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from llmtrain.errors import UserError
from llmtrain.models.bert.config import BertConfig
from llmtrain.models.bert.model import Bert, BertForSequenceClassification
from llmtrain.models.bert.objective import BertObjective
from llmtrain.models.bert.pipeline import bert_split
from llmtrain.models.bert.tp import tp_plan
from llmtrain.models.spec import ModelFamily, NamedParams

if TYPE_CHECKING:
    from llmtrain.compress.config import PruneConfig
    from llmtrain.data.config import DataConfig


def build(cfg: BertConfig) -> nn.Module:
    return BertForSequenceClassification(cfg) if cfg.num_labels else Bert(cfg)


def _check(m: BertConfig, data: DataConfig, pp: int) -> list[str]:
    kind, problems = data.sample_kind, []  # one of sample_kinds (config.validate checks that first)
    if (kind == "source_class") != (m.num_labels > 0):
        problems.append(
            f"data.sample_kind={kind} with model.num_labels={m.num_labels}: class labels need the "
            f"classifier (model.num_labels >= 2) and pre-training batches need model.num_labels=0; "
            f"set model.num_labels to match the data"
        )
    if m.num_labels > 0 and pp > 1:
        problems.append(
            f"parallel.pp={pp}: the pipeline split of model.arch=bert covers pre-training (MLM + NSP), "
            f"not the sequence classifier (model.num_labels={m.num_labels}); set parallel.pp=1"
        )
    return problems


def _matmul_params_per_token(named: NamedParams, seq_len: int, data: DataConfig | None) -> float:
    """Matmul parameters per token: lookups (position and segment tables, an untied `wte`) are left out;
    the masked-LM head (transform + decoder) runs only on the masked positions (~data.mlm_prob of them)
    in pre-training; the pooler / NSP / classifier heads once per sequence (1/seq_len of the tokens)."""
    sizes = {name: p.numel() for name, p in named}  # a tied head is listed once, as wte.weight
    lookups = {n for n in sizes if "wpe" in n or "position" in n or "wtt" in n}
    if "lm_head.weight" in sizes:
        lookups |= {n for n in sizes if n.endswith("wte.weight")}
    n_mm = float(sum(size for name, size in sizes.items() if name not in lookups))
    if data is not None and data.sample_kind == "bert" and "mlm_dense.weight" in sizes:
        head = sizes["mlm_dense.weight"] + sizes.get("lm_head.weight", sizes.get("wte.weight", 0))
        n_mm -= head * (1.0 - data.mlm_prob)
    per_sequence = sum(size for name, size in sizes.items() if name.startswith(("pooler.", "nsp_head.", "classifier.")))
    return n_mm - per_sequence * (1.0 - 1.0 / seq_len)


def _no_decay(name: str, p: Any) -> bool:
    return p.ndim < 2 or "wpe" in name  # the position table (also under the pipeline's `Embeddings.wpe`)


def _forward_inputs(model: nn.Module, batch: dict) -> Any:
    return model(batch["input_ids"], batch.get("token_type_ids"), batch.get("attention_mask"))


def _prune_target(cfg: BertConfig, new: dict[str, Any], recipe: PruneConfig) -> None:
    """BERT's pruned MLP is 4 * n_embd wide (the width a saved BERT config leaves implicit)."""
    if recipe.intermediate_size and recipe.intermediate_size != 4 * new["n_embd"]:
        raise UserError(
            f"prune recipe: BERT's MLP width is 4 * n_embd = {4 * new['n_embd']}; leave "
            f"intermediate_size unset (got {recipe.intermediate_size})"
        )
    new["intermediate_size"] = None


_PRUNE_BLOCK_AXES: dict[str, tuple[str | None, ...]] = {
    "attn.qkv.weight": ("QKV", "C"),
    "attn.qkv.bias": ("QKV",),
    "attn.proj.weight": ("C", "Q"),
    "attn.proj.bias": ("C",),
    "up.weight": ("F", "C"),
    "up.bias": ("F",),
    "down.weight": ("C", "F"),
    "down.bias": ("C",),
}
_PRUNE_TOP_AXES: dict[str, tuple[str | None, ...]] = {
    "wte.weight": (None, "C"),
    "wpe.weight": (None, "C"),
    "lm_head.weight": (None, "C"),
    # segment embeddings, pooler, MLM transform and head bias, NSP / classifier heads
    "wtt.weight": (None, "C"),
    "pooler.weight": ("C", "C"),
    "pooler.bias": ("C",),
    "mlm_dense.weight": ("C", "C"),
    "mlm_dense.bias": ("C",),
    "lm_head.bias": (None,),
    "nsp_head.weight": (None, "C"),
    "nsp_head.bias": (None,),
    "classifier.weight": (None, "C"),
    "classifier.bias": (None,),
}

FAMILY = ModelFamily(
    name="bert",
    config_class=BertConfig,
    build=build,
    objective=BertObjective,
    sample_kinds=("bert", "source_class"),
    generative=False,
    tp_plan=tp_plan,
    tp_heads=lambda m: {"model.n_head": m.n_head},
    pipeline_split=bert_split,
    check=_check,
    forward_inputs=_forward_inputs,
    matmul_params_per_token=_matmul_params_per_token,
    no_decay=_no_decay,
    prune_block_axes=_PRUNE_BLOCK_AXES,
    prune_top_axes=_PRUNE_TOP_AXES,
    prune_target=_prune_target,
    hf_adapters=("llmtrain.interop.bert",),
)
