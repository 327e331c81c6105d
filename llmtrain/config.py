"""The root config: one typed dataclass tree, loaded from YAML, overridden by dotted CLI keys.

Precedence is CLI > YAML > named model size > dataclass defaults. Loading is strict: an unknown key is
an error naming the key and the nearest valid one; a value of the wrong type is an error naming the key
and the expected type. Each component owns its sub-config (``ModelConfig`` in ``llmtrain.models``,
``DataConfig`` in ``llmtrain.data``); this module only composes them and derives the values that depend
on more than one of them (``Derived``), once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmtrain.compress.config import DistillConfig, PruneConfig, QuantConfig, QuantizeConfig
from llmtrain.data.config import DataConfig
from llmtrain.errors import ConfigError, UserError  # ConfigError: importable from here too
from llmtrain.finetune.config import DPOConfig
from llmtrain.models.config import ModelConfig, apply_model_preset, config_class_for
from llmtrain.models.registry import FAMILIES, family_of
from llmtrain.parallel.layout import ParallelDims


@dataclass
class TrainConfig:
    # Number of optimizer steps to run in total (a resumed run continues up to this step).
    max_steps: int = 300
    # Seed for weight init, data order and dropout; the same seed gives the same run on any layout.
    seed: int = 1234
    # Sequences per forward pass on one data-parallel rank.
    micro_batch_size: int = 8
    # Sequences per optimizer step over all data-parallel ranks; gradient accumulation is derived.
    global_batch_size: int = 16
    # Tokens per training sequence (must not exceed model.block_size).
    seq_len: int = 128
    # 'auto' continues from <out_dir>/checkpoints/latest if present, 'none' starts fresh, or a checkpoint path.
    resume: str = "auto"
    # Run a held-out evaluation every N steps (0 disables periodic eval; a final eval always runs).
    eval_interval: int = 100
    # Held-out micro-batches per evaluation over all ranks (the same sequences on any world size).
    eval_batches: int = 16
    # lm-eval tasks (names or task YAML paths) scored at every evaluation, e.g. [llmtrain_cloze]; needs .[eval].
    eval_tasks: list[str] = field(default_factory=list)
    # Documents per task in those evaluations (0 = all).
    eval_tasks_limit: int = 0
    # Clip the global gradient norm to this value (0 disables clipping).
    grad_clip: float = 1.0
    # Tokens generated from `sample_prompt` at the end of training (0 disables the sample).
    sample_tokens: int = 48
    # Prompt for the generated sample printed at the end of training.
    sample_prompt: str = "And God said"
    # Stop the run after this many consecutive steps with a non-finite loss (each one is skipped).
    max_nonfinite_steps: int = 5
    # Build the next step's batches on a background thread (pinned on GPU) while this step runs.
    prefetch: bool = True
    # Compile each transformer block with torch.compile (inductor); the first steps are slow while it compiles.
    compile: bool = False
    # Attention kernel for SDPA: auto (torch picks), flash, efficient (memory-efficient), cudnn or math.
    # A named kernel that cannot run the call fails loudly instead of silently falling back.
    attention_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    # The loss: family (the model family's own: next-token CE for decoders, MLM+NSP or classification for BERT)
    # or dpo (preference pairs against a frozen reference model, the dpo.* keys; a decoder only).
    objective: Literal["family", "dpo"] = "family"


@dataclass
class OptimConfig:
    # Peak learning rate reached at the end of warmup.
    lr: float = 1e-3
    # Final learning rate as a fraction of `lr` at the end of the decay.
    min_lr_ratio: float = 0.1
    # Linear warmup steps from 0 to `lr`.
    warmup_steps: int = 20
    # Steps over which the LR decays after warmup (default: the rest of train.max_steps).
    decay_steps: int | None = None
    # Decay shape after warmup.
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # AdamW decoupled weight decay (applied to matrices only, not to norms, biases or embeddings' positions).
    weight_decay: float = 0.1
    # AdamW beta1.
    beta1: float = 0.9
    # AdamW beta2.
    beta2: float = 0.95
    # AdamW epsilon.
    eps: float = 1e-8
    # Use torch's fused AdamW kernel on GPU (ignored on CPU and with offload_optimizer).
    fused: bool = True


@dataclass
class ParallelConfig:
    # DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer), 2 (+gradients), 3 (+parameters).
    zero_stage: int = 0
    # Keep optimizer state in CPU memory (ZeRO-Offload; stage 1-3).
    offload_optimizer: bool = False
    # Keep parameters in CPU memory (ZeRO-Infinity; stage 3 only).
    offload_params: bool = False
    # Tensor-parallel degree.
    tp: int = 1
    # Pipeline-parallel degree (number of stages).
    pp: int = 1
    # Context-parallel degree: each sequence is cut into 2*cp chunks, rank r of a replica's ring holds chunks
    # r and 2cp-1-r (causal load balance); the cp ranks see the same samples (llmtrain/parallel/context_parallel.py).
    cp: int = 1
    # Expert-parallel degree (model.moe): the experts of each MoE block are computed on ep data-parallel ranks,
    # E/ep each, tokens sent to them all-to-all (llmtrain/parallel/expert_parallel.py); ep divides the dp size.
    ep: int = 1
    # How attention spans the chunks of one sequence with cp > 1: ring (keys and values passed around the ring,
    # online softmax) or ulysses (all-to-all over heads: each rank attends whole sequences of n_head/cp heads).
    cp_method: Literal["ring", "ulysses"] = "ring"
    # Recompute activations in backward: none | full | selective | every_n.
    activation_checkpointing: Literal["none", "full", "selective", "every_n"] = "none"
    # With activation_checkpointing=every_n: checkpoint every n-th block.
    checkpoint_every_n: int = 2
    # How the pipeline splits layers over stages: parameters (balanced parameter counts) or layers
    # (balanced transformer-block counts).
    pipeline_partition: Literal["parameters", "layers"] = "parameters"
    # Seconds a collective (or joining the process group) may wait before the rank fails with an error.
    collective_timeout_s: float = 600.0
    # Overlap gradient reduction (and ZeRO-3 parameter gathering) with compute; default: DeepSpeed's
    # choice per stage (off for ZeRO-1/2, on for ZeRO-3).
    overlap_comm: bool | None = None
    # Elements per communication bucket: gradient reduce, parameter all-gather and ZeRO-3 prefetch.
    comm_bucket_size: int = 500_000_000
    # ZeRO-0 data parallel: all-reduce gradients in buckets of this many MiB while backward still runs (as
    # torch DDP does; llmtrain/parallel/grad_overlap.py); 0: DeepSpeed's one all-reduce after backward.
    grad_overlap_mb: float = 4.0
    # Extra DeepSpeed config keys merged last (logged); for knobs llmtrain does not model itself.
    deepspeed_overrides: dict = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    # Save a checkpoint every N steps (0: only at the end of training).
    interval: int = 100
    # Keep the last K checkpoints; older ones are deleted after a newer one is complete.
    keep_last: int = 2


@dataclass
class LogConfig:
    # Write one console line and one metrics.jsonl record every N steps.
    interval: int = 10
    # Also log to Weights & Biases (offline mode when WANDB_MODE is unset and there is no API key).
    wandb: bool = False
    # W&B project name.
    wandb_project: str = "llmtrain"
    # Show a progress bar on rank 0 when attached to a terminal.
    progress: bool = True


@dataclass
class Config:
    # Run directory: config.yaml, metrics.jsonl, checkpoints/, loss.png. An existing one is resumed.
    out_dir: str = "runs/gpt_debug"
    # Numeric format of training: fp32; bf16 (bf16 weights and compute, fp32 master weights in the
    # optimizer); bf16-autocast (fp32 weights, matmuls in bf16 under torch.autocast); fp16 (GPU only).
    precision: Literal["fp32", "bf16", "fp16", "bf16-autocast"] = "fp32"
    # The model: a named size (model.name) plus any field overrides.
    model: ModelConfig = field(default_factory=ModelConfig)
    # The data: corpus, tokenizer and loader.
    data: DataConfig = field(default_factory=DataConfig)
    # The training loop.
    train: TrainConfig = field(default_factory=TrainConfig)
    # The optimizer and learning-rate schedule.
    optim: OptimConfig = field(default_factory=OptimConfig)
    # The parallel layout and memory savers.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Checkpoint cadence and retention.
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Logging sinks.
    log: LogConfig = field(default_factory=LogConfig)
    # Knowledge distillation from a frozen teacher (launchers/distill.py); ignored by plain training.
    distill: DistillConfig = field(default_factory=DistillConfig)
    # Preference tuning (train.objective=dpo): beta and the frozen reference model; ignored otherwise.
    dpo: DPOConfig = field(default_factory=DPOConfig)
    # Structured pruning targets and importance (`llmtrain prune CHECKPOINT --recipe R`); ignored by training.
    prune: PruneConfig = field(default_factory=PruneConfig)
    # Post-training quantisation settings (`llmtrain quantize CHECKPOINT --recipe R`); ignored by training.
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    # Quantisation-aware training (train and distill): fake-quantised linears from quant.start_step on.
    quant: QuantConfig = field(default_factory=QuantConfig)


@dataclass(frozen=True)
class Derived:
    """Values computed from the config and the world size, once, in one place."""

    world_size: int
    dp_size: int
    grad_accum: int
    tokens_per_step: int
    # The layout: axis sizes, rank coordinates, process groups (llmtrain/parallel/layout.py)
    dims: ParallelDims


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a recipe YAML (or the defaults when `path` is None) and apply dotted `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    user_model_keys = set(raw.get("model") or {}) if isinstance(raw.get("model") or {}, dict) else set()
    raw = apply_model_preset(raw, ConfigError)
    _adopt_init_from_shape(raw["model"], user_model_keys)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


# Keys of a model.init_from checkpoint's config that are not its architecture (or that a run may change).
_NOT_ADOPTED = {
    "name",
    "arch",
    "init_from",
    "dropout",
    "init_std",
    "block_size",
    "vocab_size",
    "num_labels",
    "rope_scaling",
    "converters",
    "weight_quant",
    "lora",
}  # converters (and their settings, lora too): this run's choice, applied after init_from


def _adopt_init_from_shape(model: dict[str, Any], user_keys: set[str]) -> None:
    """A model.init_from checkpoint of the same family (e.g. a pruned one) gives the model its shape: its
    architecture keys replace the named size's, except those the recipe or the command set (a conflict
    there fails when the weights load, naming the parameter). Printed, so the run says what it adopted."""
    path = model.get("init_from")
    if not path:
        return
    from llmtrain.models.config import model_config_from_dict
    from llmtrain.parallel.checkpoint_paths import resolve_checkpoint
    from llmtrain.utils import print0

    try:  # only the saved config.yaml: the weights are read (and verified) when they load
        where = Path(path) if (Path(path) / "model.safetensors").is_file() else resolve_checkpoint(path)
        saved = model_config_from_dict(
            yaml.safe_load((where / "config.yaml").read_text())["model"], str(where / "config.yaml")
        )
    except (ValueError, OSError, KeyError, TypeError, yaml.YAMLError):
        return  # training names the problem when it loads the weights
    if family_of(saved).name != family_of(model.get("arch", ModelConfig.arch), ConfigError).name:
        return
    unset = dataclasses.asdict(type(saved)())  # a key the preset leaves out has its class default
    adopted = {
        k: v
        for k, v in dataclasses.asdict(saved).items()
        if k not in _NOT_ADOPTED and k not in user_keys and model.get(k, unset.get(k)) != v
    }
    if adopted:
        model.update(adopted)
        print0(
            f"model.init_from={path}: adopted the checkpoint's shape "
            + " ".join(f"model.{k}={v}" for k, v in adopted.items())
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"recipe file not found: {path} (pass a YAML file from recipes/, e.g. recipes/gpt_debug.yaml)"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must contain a mapping of config keys at the top level")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.max_steps=50")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            valid = [prefix + n for n in names]
            near = difflib.get_close_matches(prefix + str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys here: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if tp is ModelConfig and isinstance(value, dict):  # the family's own config class (model.arch)
            tp, value = config_class_for(value, ConfigError)
        return _build(tp, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{key}' must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list; got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping; got {value!r}")
        return value
    return _coerce_scalar(tp, value, key)


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"'{key}' must be of type {tp.__name__}; got {value!r} ({type(value).__name__})")


# ---------------------------------------------------------------------------------------------
# Validation and derived values


def validate(cfg: Config) -> None:
    """Checks that need no world size: ranges and combinations of keys."""
    t, p = cfg.train, cfg.parallel
    _positive(t.max_steps, "train.max_steps")
    _positive(t.micro_batch_size, "train.micro_batch_size")
    _positive(t.global_batch_size, "train.global_batch_size")
    _positive(t.seq_len, "train.seq_len")
    _positive(p.tp, "parallel.tp")
    _positive(p.pp, "parallel.pp")
    _positive(p.cp, "parallel.cp")
    _check_numbers(cfg)
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3; got {p.zero_stage}")
    if t.seq_len > cfg.model.block_size:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.block_size={cfg.model.block_size}; "
            f"lower train.seq_len or raise model.block_size"
        )
    if p.offload_optimizer and p.zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
    if p.offload_params and p.zero_stage != 3:
        raise ConfigError("parallel.offload_params needs parallel.zero_stage=3")
    if t.resume not in ("auto", "none") and not t.resume:
        raise ConfigError("train.resume must be 'auto', 'none' or a checkpoint path")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")
    if cfg.log.interval < 1:
        raise ConfigError("log.interval must be >= 1")
    if getattr(cfg.model, "lora", None) is not None and "quantized_weights" in cfg.model.converters and p.tp > 1:
        raise ConfigError(
            "QLoRA (model.lora over model.converters: [quantized_weights]) needs parallel.tp=1: tensor-parallel "
            "shards hold float weights; use ZeRO (parallel.zero_stage) to spread it, or LoRA on a float base"
        )
    if cfg.data.doc_mask and p.pp > 1:
        raise ConfigError(
            "data.doc_mask needs parallel.pp=1 (pipeline stages pass only hidden states, not the "
            "document mask); set data.doc_mask=false or parallel.pp=1"
        )
    _check_model_family(cfg)
    if p.cp > 1:
        _check_context_parallel(cfg)
    _check_moe(cfg)
    _check_quant(cfg)


def _check_quant(cfg: Config) -> None:
    """quant.* against the model's linears and the tensor-parallel split (built on the meta device)."""
    if cfg.quant.bits is None:
        return
    from llmtrain.compress.quant.qat import check_quant

    check_quant(cfg.quant, cfg.model, cfg.parallel.tp)


def _check_model_family(cfg: Config) -> None:
    """The data kind is one the model's family reads, and the family's own checks pass."""
    family, kind = family_of(cfg.model), cfg.data.sample_kind
    if kind not in family.sample_kinds:
        readers = "/".join(f.name for f in FAMILIES.values() if kind in f.sample_kinds) or "no family"
        raise ConfigError(
            f"data.sample_kind={kind} feeds model.arch={readers}, but model.name={cfg.model.name} is "
            f"model.arch={family.name}, which reads data.sample_kind={'/'.join(family.sample_kinds)}; "
            f"set data.sample_kind={family.sample_kinds[0]} or pick a {readers} size with model.name"
        )
    problems = family.check(cfg.model, cfg.data, cfg.parallel.pp)
    if problems:
        raise ConfigError(problems[0])
    _check_model_shape(cfg)


def _check_model_shape(cfg: Config) -> None:
    """Build the model on the meta device (no memory, no weights): a shape its modules refuse (model.n_head
    not dividing model.n_embd, an odd rotary head size, ...) is a config error here, before anything runs."""
    import torch

    try:
        with torch.device("meta"):
            family_of(cfg.model).build(cfg.model)
    except UserError as exc:
        raise ConfigError(str(exc)) from None


def _positive(value: int, key: str) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1; got {value}")


def _check_numbers(cfg: Config) -> None:
    """Numbers that can only be a mistake, refused before anything starts (they used to pass silently or
    fail steps later): counts below their minimum, rates and fractions outside their range."""
    t, o = cfg.train, cfg.optim
    _positive(t.eval_batches, "train.eval_batches")  # the final eval always runs: 0 batches is no eval loss
    _positive(t.max_nonfinite_steps, "train.max_nonfinite_steps")
    at_least_0 = {
        "optim.warmup_steps": o.warmup_steps,
        "optim.decay_steps": o.decay_steps or 0,
        "optim.weight_decay": o.weight_decay,
        "train.grad_clip": t.grad_clip,
        "train.eval_interval": t.eval_interval,
        "train.sample_tokens": t.sample_tokens,
        "train.eval_tasks_limit": t.eval_tasks_limit,
        "checkpoint.interval": cfg.checkpoint.interval,
    }
    for key, value in at_least_0.items():
        if not value >= 0:  # also NaN
            raise ConfigError(f"{key} must be >= 0; got {value}" + (" (0 disables it)" if key in _ZERO_OFF else ""))
    ranges = {
        "optim.lr": (o.lr, 0 <= o.lr < math.inf, ">= 0 and finite"),
        "optim.eps": (o.eps, o.eps > 0, "> 0"),
        "optim.min_lr_ratio": (o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
        "optim.beta1": (o.beta1, 0 <= o.beta1 < 1, "in [0, 1)"),
        "optim.beta2": (o.beta2, 0 <= o.beta2 < 1, "in [0, 1)"),
        "parallel.collective_timeout_s": (
            cfg.parallel.collective_timeout_s,
            cfg.parallel.collective_timeout_s > 0,
            "> 0",
        ),
    }
    for key, (value, ok, allowed) in ranges.items():
        if not ok:
            raise ConfigError(f"{key} must be {allowed}; got {value}")


_ZERO_OFF = ("train.grad_clip", "train.eval_interval", "train.sample_tokens", "checkpoint.interval")


def derive(cfg: Config, world_size: int) -> Derived:
    """Layout checks that need the world size, and the values derived from it."""
    t, p = cfg.train, cfg.parallel
    dims = ParallelDims.for_world(world_size, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep)
    dp = dims.dp
    _check_model_split(cfg)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size * "
            f"data-parallel size = {t.micro_batch_size}*{dp} = {per_step}; set train.global_batch_size to a "
            f"multiple of {per_step}"
        )
    grad_accum = t.global_batch_size // per_step
    if p.pp > 1 and grad_accum < p.pp:
        raise ConfigError(
            f"parallel.pp={p.pp} needs at least {p.pp} micro-batches per step to keep every stage busy, but "
            f"train.global_batch_size / (train.micro_batch_size * data-parallel size) = {t.global_batch_size}/"
            f"({t.micro_batch_size}*{dp}) = {grad_accum}; lower train.micro_batch_size or raise "
            f"train.global_batch_size to at least {p.pp * per_step}"
        )
    return Derived(
        world_size=world_size,
        dp_size=dp,
        grad_accum=grad_accum,
        tokens_per_step=t.global_batch_size * t.seq_len,
        dims=dims,
    )


def _check_context_parallel(cfg: Config) -> None:
    """What parallel.cp > 1 works with (llmtrain/parallel/context_parallel.py); each refusal says why."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    key = f"parallel.cp={p.cp}"
    if p.cp_method == "ulysses" and (m.n_head // p.tp) % p.cp:
        raise ConfigError(
            f"model.n_head={m.n_head} (per tensor-parallel rank: {m.n_head // p.tp}) is not divisible by {key}: "
            f"parallel.cp_method=ulysses gives each cp rank whole heads of the whole sequence; choose a "
            f"parallel.cp that divides {m.n_head // p.tp} or parallel.cp_method=ring"
        )
    if t.seq_len % (2 * p.cp):
        raise ConfigError(
            f"train.seq_len={t.seq_len} is not divisible by 2*parallel.cp = {2 * p.cp} (each sequence is cut "
            f"into 2*cp equal chunks, a front and a back one per rank); set train.seq_len to a multiple of {2 * p.cp}"
        )
    refusals = [
        (
            p.pp > 1,
            "parallel.pp=1",
            "pipeline stages pass only hidden states, while every block's attention "
            "must exchange keys and values with the other chunks of the sequence",
        ),
        (
            not family_of(m).context_parallel,
            "a family that declares context_parallel (a decoder: model.arch=gpt)",
            f"the ring attention is causal; model.arch={family_of(m).name} is not a causal language model",
        ),
        (m.dropout > 0, "model.dropout=0", "the ring attention has no attention dropout"),
        (t.compile, "train.compile=false", "compiling blocks around the ring's send/recv was not tried"),
        (bool(cfg.distill.teacher), "distill.teacher=''", "the teacher would need the same sequence split"),
        (
            t.objective != "family",
            "train.objective=family",
            f"train.objective={t.objective} scores whole sequences (log-probs of chosen and rejected answers); "
            f"context parallel splits the causal LM loss only",
        ),
    ]
    for refused, fix, reason in refusals:
        if refused:
            raise ConfigError(f"{key} needs {fix}: {reason}")


def _check_moe(cfg: Config) -> None:
    """What model.moe and parallel.ep work with (llmtrain/models/gpt/moe.py, parallel/expert_parallel.py)."""
    p, moe = cfg.parallel, getattr(cfg.model, "moe", None)
    if isinstance(p.ep, bool) or not isinstance(p.ep, int) or p.ep < 1:
        raise ConfigError(f"parallel.ep must be an integer >= 1, got {p.ep!r}")
    if moe is None:
        if p.ep > 1:
            raise ConfigError(
                f"parallel.ep={p.ep} splits mixture-of-experts layers, and this model has none; set model.moe "
                f"(model.moe.num_experts=...) or parallel.ep=1"
            )
        return
    if moe.num_experts % p.ep:
        raise ConfigError(
            f"model.moe.num_experts={moe.num_experts} is not divisible by parallel.ep={p.ep}: each expert-parallel "
            f"rank computes num_experts/ep whole experts; choose a parallel.ep that divides {moe.num_experts}"
        )
    refusals = [
        (p.tp > 1, "parallel.tp=1", "the tensor-parallel plans do not shard expert weights"),
        (p.pp > 1, "parallel.pp=1", "pipeline stages pass only hidden states, not the router's auxiliary losses"),
        (p.cp > 1, "parallel.cp=1", "the router's load-balance statistics would be per sequence chunk"),
    ]
    for refused, fix, reason in refusals:
        if refused:
            raise ConfigError(f"model.moe needs {fix}: {reason}")
    if p.ep > 1 and p.zero_stage == 3:
        raise ConfigError(
            f"parallel.ep={p.ep} works with parallel.zero_stage 0, 1 or 2: each ep rank holds other experts, and "
            f"ZeRO-3 partitions every parameter over all data-parallel ranks; set parallel.zero_stage=2 or "
            f"parallel.ep=1"
        )
    if p.ep > 1 and p.zero_stage == 0 and cfg.precision in ("bf16", "fp16"):
        raise ConfigError(
            f"parallel.ep={p.ep} with precision={cfg.precision} needs parallel.zero_stage 1 or 2: DeepSpeed's "
            f"ZeRO-0 {cfg.precision} optimizer reports the gradient norm of per-rank experts ~2% low (and clips "
            f"with it); set parallel.zero_stage=1"
        )


def _check_model_split(cfg: Config) -> None:
    """Whether the model can be cut into parallel.tp shards and parallel.pp stages with this ZeRO stage."""
    p, m = cfg.parallel, cfg.model
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(
            f"parallel.pp={p.pp} works only with parallel.zero_stage 0 or 1 (a DeepSpeed limit: its pipeline "
            f"engine keeps whole gradients across micro-batches, which ZeRO-2/3 partition); set "
            f"parallel.zero_stage=1 or parallel.pp=1"
        )
    if p.tp > 1 and p.zero_stage > 2:
        raise ConfigError(
            f"parallel.tp={p.tp} works with parallel.zero_stage 0, 1 or 2 (ZeRO-3 would partition the tensor-"
            f"parallel shards again); set parallel.zero_stage=2 or parallel.tp=1"
        )
    if p.pp > m.n_layer:
        raise ConfigError(
            f"parallel.pp={p.pp} exceeds model.n_layer={m.n_layer}: every stage needs a layer; "
            f"set parallel.pp <= {m.n_layer}"
        )
    for key, n in family_of(m).tp_heads(m).items():
        if n % p.tp:
            raise ConfigError(
                f"{key}={n} is not divisible by parallel.tp={p.tp}: each tensor-parallel rank "
                f"holds whole heads; choose a parallel.tp that divides {n}"
            )
    if p.tp > 1 and m.vocab_size % p.tp:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp} (the "
            f"embedding is split by vocabulary rows); pad it: model.vocab_size="
            f"{-(-m.vocab_size // (64 * p.tp)) * 64 * p.tp} (model.init_from fills the extra rows of a "
            f"smaller checkpoint's vocabulary with fresh ones)"
        )


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temp file then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
