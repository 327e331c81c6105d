"""Text from, and perplexity of, a trained or imported decoder: the library behind `llmtrain generate` and
`llmtrain eval` (their command line lives in llmtrain/evaluation/cli.py).

CHECKPOINT is a run directory (its latest checkpoint), a `checkpoints/` folder, one `step_*` folder, a
consolidated folder or an `llmtrain import-hf` folder. The weights are read one parameter at a time
from the layout-independent copy every checkpoint holds (`load_model_weights`), whatever ZeRO stage,
tensor or pipeline layout wrote it, so only one copy of the model is ever in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from llmtrain.errors import UserError

if TYPE_CHECKING:  # torch loads on first use, so `llmtrain --help` stays fast
    import torch

    from llmtrain.data import DataConfig
    from llmtrain.models.gpt.model import GPT

TOKENIZER_DIR = "tokenizer"


def load_decoder(path: str | Path, device: str = "cpu") -> tuple[Any, torch.nn.Module]:
    """(ModelConfig, eval-mode decoder with the checkpoint's weights) of the checkpoint at `path`."""
    import torch

    from llmtrain.models.converters import build_converted_model
    from llmtrain.models.registry import FAMILIES, family_of
    from llmtrain.parallel.consolidate import load_model_weights

    cfg, weights = load_model_weights(path)
    family = family_of(cfg)
    if not family.generative:
        raise UserError(
            f"{path} holds a model.arch={family.name} model; generate and eval need a decoder "
            f"(a generative family: {', '.join(f.name for f in FAMILIES.values() if f.generative)}); "
            f"a BERT model takes `llmtrain eval MODEL --tasks bert_mlm,bert_classify`"
        )
    with torch.device("meta"):
        model = build_converted_model(cfg)  # the checkpoint's converters too: their parameters are in weights
    model.load_state_dict(weights, assign=True)
    if cfg.tie_embeddings:  # assign=True replaces the shared Parameter object per name: tie again
        decoder = cast("GPT", model)  # generative: the decoder family
        decoder.lm_head.weight = decoder.wte.weight
    return cfg, model.to(device).eval()


def checkpoint_tokenizer(path: str | Path) -> Any:
    """The tokenizer a checkpoint was trained with: its own `tokenizer/` folder (import-hf writes one),
    else the one its saved config's data section names (data.tokenizer_path, bundled corpus, prepared
    dataset or stream)."""
    from llmtrain.data import load_tokenizer
    from llmtrain.data.bundled import bundled_tokenizer_dir

    root = _checkpoint_dir(path)
    for d in (root / TOKENIZER_DIR, Path(path) / TOKENIZER_DIR):
        if d.is_dir():
            return load_tokenizer(d)
    data = _saved_config(root).data
    if data.tokenizer_path:  # a classifier's passages built with a model's own tokenizer
        return load_tokenizer(data.tokenizer_path)
    if data.stream:
        return load_tokenizer(data.stream_tokenizer or bundled_tokenizer_dir(data))
    first = data.sources[0].path if data.sources else data.path
    return load_tokenizer(bundled_tokenizer_dir(data) if first == "bundled" else Path(first))


def _checkpoint_dir(path: str | Path) -> Path:
    from llmtrain.train.checkpoint import resolve_checkpoint

    p = Path(path)
    if (p / "config.yaml").is_file() and not (p / "checkpoints").exists():
        return p  # consolidated or imported folder, or a step folder
    return resolve_checkpoint(p)


def _saved_config(ckpt: Path) -> Any:
    from llmtrain.config import load_config

    if not (ckpt / "config.yaml").is_file():
        raise UserError(f"{ckpt} has no config.yaml; pass a checkpoint written by llmtrain")
    return load_config(ckpt / "config.yaml")


def default_device(name: str = "") -> str:
    """`name`, or cuda when a GPU is present, else cpu."""
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def generate_text(
    checkpoint: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    tokenizer: str = "",
    device: str = "",
    use_cache: bool = True,
) -> str:
    """The prompt and its continuation by the decoder at `checkpoint` (its own tokenizer unless one is given)."""
    import torch

    from llmtrain.data import load_tokenizer
    from llmtrain.models.generation import generate

    device = default_device(device)
    cfg, model = load_decoder(checkpoint, device)
    tok = load_tokenizer(tokenizer) if tokenizer else checkpoint_tokenizer(checkpoint)
    ids = tok.encode(prompt)
    if not ids:
        raise UserError("--prompt encodes to no tokens; give at least one character")
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(
        model,
        prompt_ids,
        max_new_tokens,
        cfg.block_size,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=gen,
        use_cache=use_cache,
    )
    return tok.decode(out[0].tolist())


def perplexity_on(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: str) -> tuple[float, int]:
    """(mean next-token loss over every labelled token, number of tokens) of `batches`."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="eval", unit="batch", disable=None):
            logits = model(batch["input_ids"].to(device)).float()
            labels = batch["labels"].to(device)
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / max(count, 1), count


def eval_perplexity(
    checkpoint: str | Path,
    data: str = "bundled",
    seq_len: int = 0,
    batch_size: int = 8,
    batches: int = 50,
    device: str = "",
) -> tuple[float, int]:
    """(mean next-token loss, tokens) of the decoder at `checkpoint` on the validation split of `data` (a
    prepared dataset or 'bundled'), which must be tokenized with the checkpoint's tokenizer."""
    from llmtrain.data import build_data

    device = default_device(device)
    cfg, model = load_decoder(checkpoint, device)
    seq_len = seq_len or cfg.block_size
    if seq_len > cfg.block_size:
        raise UserError(f"--seq-len {seq_len} exceeds the model's block_size {cfg.block_size}")
    run_data = build_data(
        eval_data_config(checkpoint, data),
        seq_len=seq_len,
        seed=0,
        micro_batch_size=batch_size,
        grad_accum=1,
        dp_rank=0,
        dp_size=1,
    )
    if run_data.vocab_size > cfg.vocab_size:
        raise UserError(
            f"--data {data}: its tokenizer has {run_data.vocab_size} tokens but the model only "
            f"{cfg.vocab_size}; evaluate on data prepared with the model's tokenizer"
        )
    try:
        expected = checkpoint_tokenizer(checkpoint).hash
    except UserError:
        expected = None  # no recorded tokenizer: trust the caller
    if expected is not None and run_data.tokenizer.hash != expected:
        raise UserError(
            f"--data {data} was tokenized with a different tokenizer (hash {run_data.tokenizer.hash}) "
            f"than the checkpoint's ({expected}); prepare it with the checkpoint's tokenizer"
        )
    return perplexity_on(model, run_data.val_batches(batches), device)


def eval_data_config(checkpoint: str | Path, data: str) -> DataConfig:
    """The data section to evaluate on: the checkpoint's own (for its tokenizer settings) with `data` as path."""
    import dataclasses

    from llmtrain.data import DataConfig

    try:
        base = _saved_config(_checkpoint_dir(checkpoint)).data
    except UserError:
        base = DataConfig()
    return dataclasses.replace(base, path=data, sources=[], stream="")


class ChatSession:
    """A conversation with the decoder at `checkpoint` through its chat template (`llmtrain generate --chat`):
    each `say(text)` adds a user turn, renders the whole history with the generation prompt, and returns the
    reply up to the template's end-of-turn text (e.g. `<|im_end|>`) or EOS, which is kept in the history.

    The template is the one beside the checkpoint's tokenizer (an import's `tokenizer_config.json`, or that of
    the chat data a run was trained on) or `template` (a built-in name such as chatml, or a jinja file)."""

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        system: str = "",
        template: str = "",
        tokenizer: str = "",
        device: str = "",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        use_cache: bool = True,
    ) -> None:
        import torch

        from llmtrain.data import load_tokenizer
        from llmtrain.data.chat import load_chat_template

        self.device = default_device(device)
        self.cfg, self.model = load_decoder(checkpoint, self.device)
        self.tok = load_tokenizer(tokenizer) if tokenizer else checkpoint_tokenizer(checkpoint)
        self.template = load_chat_template(Path(self.tok.source), template)
        self.history = [{"role": "system", "content": system}] if system else []
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, use_cache=use_cache)
        self.max_new_tokens = max_new_tokens
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def say(self, text: str) -> str:
        import torch

        from llmtrain.models.generation import generate

        self.history.append({"role": "user", "content": text})
        prompt = self.template.render(self.history, add_generation_prompt=True)
        ids = torch.tensor([self.tok.encode(prompt)], dtype=torch.long, device=self.device)
        n, end, eos = ids.size(1), self.template.end_of_turn, self.tok.eos_id

        def stop(idx: torch.Tensor) -> bool:
            return int(idx[0, -1]) == eos or bool(end) and end in self.tok.decode(idx[0, n:].tolist())

        out = generate(
            self.model,
            ids,
            self.max_new_tokens,
            self.cfg.block_size,
            generator=self.generator,
            stop=stop,
            **self.sampling,  # type: ignore[arg-type]
        )
        reply = self.tok.decode(out[0, n:].tolist())
        reply = reply.split(end, 1)[0] if end else reply
        reply = reply.split(self.tok.eos_token, 1)[0].strip()
        self.history.append({"role": "assistant", "content": reply})
        return reply
