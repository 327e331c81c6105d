"""A LoRA checkpoint's adapters as a PEFT adapter directory (`llmtrain export-hf RUN OUT --adapter`).

Writes `adapter_config.json` and `adapter_model.safetensors` in PEFT's format, so that

    base = AutoModelForCausalLM.from_pretrained(BASE_HF)          # `llmtrain export-hf BASE BASE_HF`
    model = peft.PeftModel.from_pretrained(base, OUT)

computes what the LoRA model computes. BASE is the run's `model.init_from` (the adapter config records it
as `base_model_name_or_path`). Keys are PEFT's: `base_model.model.<module>.lora_A.weight` (r x in) and
`.lora_B.weight` (out x r), module names of transformers' twin:

    ours                GPT2LMHeadModel (Conv1D: fan_in_fan_out)   LlamaForCausalLM
    blocks.i.attn.qkv   transformer.h.i.attn.c_attn                 model.layers.i.self_attn.{q,k,v}_proj
    blocks.i.attn.proj  transformer.h.i.attn.c_proj                 model.layers.i.self_attn.o_proj
    blocks.i.mlp.gate   -                                           model.layers.i.mlp.gate_proj
    blocks.i.mlp.up     transformer.h.i.mlp.c_fc                    model.layers.i.mlp.up_proj
    blocks.i.mlp.down   transformer.h.i.mlp.c_proj                  model.layers.i.mlp.down_proj

Llama's q, k and v are separate linears where ours are one: their adapters share our A and take B's row
blocks [q; k; v], which is exactly the fused adapter. The format was read from PEFT's documentation and
its saved files; nothing of PEFT is imported here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrain.errors import UserError
from llmtrain.model_dir import check_output, writing

if TYPE_CHECKING:
    import torch

    from llmtrain.models.gpt.config import GPTConfig

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_GPT2 = {"attn.qkv": ["attn.c_attn"], "attn.proj": ["attn.c_proj"], "mlp.up": ["mlp.c_fc"], "mlp.down": ["mlp.c_proj"]}
_LLAMA = {
    "attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn.proj": ["self_attn.o_proj"],
    "mlp.gate": ["mlp.gate_proj"],
    "mlp.up": ["mlp.up_proj"],
    "mlp.down": ["mlp.down_proj"],
}


def peft_adapter(cfg: GPTConfig, weights: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json's content, PEFT state dict) of a LoRA model's config and state dict."""
    from llmtrain.interop import gpt2, llama

    lora = cfg.lora
    if lora is None:
        raise UserError("export-hf --adapter needs a LoRA checkpoint (model.lora set); this model has no adapters")
    if llama.exports(cfg):
        names, layers, fan_in_fan_out = _LLAMA, "model.layers", False
    elif gpt2.exports(cfg):
        names, layers, fan_in_fan_out = _GPT2, "transformer.h", True
    else:
        raise UserError("export-hf --adapter: this decoder has no transformers twin (GPT-2 or Llama flavour)")
    hs = cfg.head_dim or cfg.n_embd // cfg.n_head
    split = [cfg.n_head * hs, (cfg.n_kv_head or cfg.n_head) * hs, (cfg.n_kv_head or cfg.n_head) * hs]
    out: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    for key in weights:
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.lora_a", key)
        if m is None:
            continue
        i, ours = m.group(1), m.group(2)
        a, b = weights[key], weights[f"blocks.{i}.{ours}.lora_b"]
        theirs = names[ours]
        parts = b.split(split) if len(theirs) == 3 else (b,)
        for name, part in zip(theirs, parts):
            pre = f"base_model.model.{layers}.{i}.{name}"
            out[f"{pre}.lora_A.weight"] = a.float().contiguous().clone()
            out[f"{pre}.lora_B.weight"] = part.float().contiguous()
            modules.add(name)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        # a regular expression over the whole module name: these modules of every layer, nothing else
        "target_modules": rf"{re.escape(layers)}\.\d+\.({'|'.join(re.escape(n) for n in sorted(modules))})",
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": cfg.init_from,
    }
    return config, out


def export_adapter(checkpoint: str | Path, out_dir: str | Path, replace: bool = False) -> Path:
    """Write the checkpoint's LoRA adapters as a PEFT adapter directory (atomic, as model directories are)."""
    from safetensors.torch import save_file

    from llmtrain.parallel.consolidate import load_model_weights

    check_output(out_dir, replace)
    cfg, weights = load_model_weights(checkpoint)
    config, tensors = peft_adapter(cfg, weights)  # type: ignore[arg-type]
    del weights
    with writing(out_dir, replace) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(out_dir)
