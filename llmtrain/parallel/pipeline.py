"""Pipeline parallel: the plain GPT (or BERT, `pipeline_bert.py`) split into DeepSpeed `PipelineModule`
stages, and its runner.

The model file knows nothing of pipelines. `gpt_pipeline_layers` reads the plain model as a flat list
of layers, embed -> positions -> blocks -> final norm -> head, reusing the model's own (already
initialised) modules, so every layout starts from the same weights. The token embedding and the output
head share one weight: DeepSpeed's `TiedLayerSpec` keeps a copy on the first and the last stage and
all-reduces its gradient between the two, so they stay equal, and counts it once in the gradient norm.
A `PipelineSplit` bundles a family's layers with how a micro-batch dict feeds them (first-stage inputs,
last-stage labels) and how the objective reads the labels back; `pipeline_split` picks it by model.arch.

DeepSpeed runs the 1F1B schedule (`TrainSchedule`) over the gradient-accumulation micro-batches of one
optimizer step, so micro-batches per step = gradient accumulation = the number of micro-batches in
flight. DeepSpeed refuses ZeRO-2/3 with pipelines (gradients must stay whole across micro-batches);
`llmtrain.config.derive` says so before anything starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from llmtrain.parallel.ds_compat import replace_fp32_clipping
from llmtrain.parallel.layout import ParallelDims, model_parallel_grad_norm
from llmtrain.parallel.runner import StepResult, load_engine, save_engine
from llmtrain.parallel.tensor_parallel import full_logits, loss_context
from llmtrain.models.objective import Objective, local_loss, pop_metrics as objective_metrics
from llmtrain.utils import print0

# partition name in our config -> DeepSpeed's partition_method
PARTITIONS = {"parameters": "parameters", "layers": "type:Block"}


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class _Reuse(nn.Module):
    """A pipeline layer built from an existing module of the plain model (no new weights)."""

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.inner, self.fn = module, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.inner, x)


class TiedEmbedding(nn.Module):
    """The token embedding and the output head that shares its weight, as one module: DeepSpeed builds
    it on the first stage (used as `embed`) and on the last (used as `head`) and keeps the two equal.
    Holding the model's own modules keeps their behaviour, tensor-parallel ones included."""

    def __init__(self, embed: nn.Module, head: nn.Module):
        super().__init__()
        self.embed, self.head = embed, head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)  # (B, T, C)


class Positions(nn.Module):
    """Adds the model's absolute positions, if any (rotary ones live in the blocks), and embedding
    dropout. Keeps the attribute name `wpe` so the optimizer's no-decay rule for position tables finds
    it under the pipeline's names too."""

    def __init__(self, wpe: nn.Module | None, drop: nn.Module):
        super().__init__()
        self.wpe, self.drop = wpe, drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(x.shape[1], device=x.device))
        return self.drop(x)  # (B, T, C)


def _head(tied: TiedEmbedding, x: torch.Tensor) -> torch.Tensor:
    return tied.head(x)  # (B, T, V), or its vocabulary shard with tensor parallel


def gpt_pipeline_layers(model: nn.Module) -> list[Any]:
    """The plain GPT as a flat list of pipeline layers (modules and tied specs), outermost first."""
    tied = model.cfg.tie_embeddings
    if tied:
        embed = TiedLayerSpec("embed", TiedEmbedding, model.wte, model.lm_head, tied_weight_attr="embed.weight")
        head = TiedLayerSpec("embed", TiedEmbedding, model.wte, model.lm_head, forward_fn=_head,
                             tied_weight_attr="embed.weight")
    else:
        embed, head = _Reuse(model.wte, _call), _Reuse(model.lm_head, _call)
    positions = Positions(model.wpe, model.drop)
    return [embed, positions, *model.blocks, model.ln_f, head]


class PipelineSplit(NamedTuple):
    """A model family as pipeline layers, and how a micro-batch (the data's dict) feeds them. DeepSpeed
    gives the first stage `inputs` and the loss function on the last stage `labels`, nothing else."""

    layers: list[Any]  # modules and tied specs, outermost first
    legend: str  # what the layers are, for the partition log line
    inputs: Callable[[dict[str, torch.Tensor]], Any]  # micro-batch -> the first stage's tensor or tuple
    labels: Callable[[dict[str, torch.Tensor]], Any]  # micro-batch -> what reaches the loss function
    as_batch: Callable[[Any], dict[str, torch.Tensor]]  # those labels -> the batch keys the objective reads
    decoder: bool  # the last stage's output is next-token logits (generation can use the pipeline)


def gpt_split(model: nn.Module) -> PipelineSplit:
    return PipelineSplit(gpt_pipeline_layers(model), f"embed, positions, {len(model.blocks)} blocks, final norm, head",
                         inputs=lambda mb: mb["input_ids"], labels=lambda mb: mb["labels"],
                         as_batch=lambda labels: {"input_ids": None, "labels": labels}, decoder=True)


def pipeline_split(model: nn.Module) -> PipelineSplit:
    """The split of `model`'s family (model.arch)."""
    if model.cfg.arch == "bert":
        from llmtrain.parallel.pipeline_bert import bert_split

        return bert_split(model)
    return gpt_split(model)


def build_pipeline_module(split: PipelineSplit, dims: ParallelDims, partition: str,
                          loss_fn: Callable | None) -> PipelineModule:
    """Split the layers into `dims.pp` stages over the layout's process topology (rank order: layout.py)."""
    if partition not in PARTITIONS:
        raise ValueError(f"pipeline partition must be one of {', '.join(PARTITIONS)}; got {partition!r}")
    topology = dims.ds_topology()
    layers = split.layers
    module = PipelineModule(layers=layers, topology=topology, loss_fn=loss_fn, partition_method=PARTITIONS[partition])
    stages = "; ".join(f"stage {i}: layers {a}-{b - 1}" for i, (a, b) in enumerate(zip(module.parts, module.parts[1:])))
    print0(f"pipeline partition by {partition} of {len(layers)} layers ({split.legend}): {stages}")
    return module


class ObjectiveLoss:
    """Runs an Objective on the last stage: the stage's output stands in for the model's output.

    The objective calls `model(batch["input_ids"], ...)`; here "the model" returns what the pipeline
    already computed (logits, or BERT's (masked-LM, next-sentence) logits), and the batch holds the labels
    under the keys the objective reads, so the same objective code computes the same loss on every layout.
    """

    def __init__(self, objective: Objective, as_batch: Callable[[Any], dict[str, torch.Tensor]]):
        self.objective, self.as_batch = objective, as_batch

    def __call__(self, outputs: Any, labels: Any) -> torch.Tensor:
        loss = self.objective(lambda *_args: outputs, self.as_batch(labels))
        return local_loss(loss)  # DeepSpeed sums and all-reduces plain tensors


class PipelineRunner:
    """Pipeline (x data) parallel with ZeRO 0/1: DeepSpeed's PipelineEngine runs 1F1B per optimizer step."""

    def __init__(self, engine: Any, split: PipelineSplit, device: torch.device, width: int, vocab: int,
                 universal: Any = None):
        self.engine, self.split, self.device, self.universal = engine, split, device, universal
        self._width, self._vocab = width, vocab  # shapes of the activations and logits sent between stages
        grid = engine.grid
        self.dp_rank, self.dp_size = grid.get_data_parallel_id(), grid.get_data_parallel_world_size()
        self.stage, self.num_stages = grid.get_stage_id(), engine.num_stages
        self.tp = grid.get_slice_parallel_world_size()
        self._norm: float | None = None
        if engine.gradient_clipping() > 0 and not (engine.zero_optimization() or engine.bfloat16_enabled()
                                                   or engine.fp16_enabled()):
            self._record_fp32_norm()

    def _record_fp32_norm(self) -> None:
        # ZeRO-0 fp32 clips through engine.clip_fp32_gradients, whose DeepSpeed norm counts only the
        # parameters of the first stage (it treats pipeline stages like tensor-parallel ranks that
        # replicate unmarked parameters) and drops the result. Clip here instead, the way the one-rank
        # engine does: norm over every stage, tied copies counted once, coef = max / (norm + 1e-6).
        engine = self.engine

        def clip_and_record() -> None:
            params = [p for p in engine.module.parameters() if p.grad is not None]
            self._norm = model_parallel_grad_norm(params, engine.mpu.get_model_parallel_group(),
                                         engine.grid.get_slice_parallel_rank())
            coef = min(1.0, engine.gradient_clipping() / (self._norm + 1e-6))
            for p in params:
                p.grad.mul_(coef)

        replace_fp32_clipping(engine, clip_and_record)

    def _pairs(self, micro_batches: list[dict[str, torch.Tensor]]) -> Any:
        return iter([(self.split.inputs(mb), self.split.labels(mb)) for mb in micro_batches])

    def train_step(self, objective, micro_batches, measure_norm):
        if not isinstance(self.engine.module.loss_fn, ObjectiveLoss) or self.engine.module.loss_fn.objective is not objective:
            self.engine.module.loss_fn = ObjectiveLoss(objective, self.split.as_batch)
        pairs = self._pairs(micro_batches)
        with loss_context(self.tp):  # vocab-parallel cross-entropy on the last stage, forward and backward
            loss = self.engine.train_batch(data_iter=pairs)  # mean over micro-batches and dp replicas
        norm = None
        if measure_norm:
            from llmtrain.parallel.engine import reported_grad_norm

            norm = self._norm if self._norm is not None else reported_grad_norm(self.engine)
        return StepResult(loss.detach().float().to(self.device), norm, False)

    @torch.no_grad()
    def eval_loss(self, objective, batch):
        self.engine.module.loss_fn = ObjectiveLoss(objective, self.split.as_batch)
        with loss_context(self.tp):  # the mean over dp replicas, on every stage
            loss = self.engine.eval_batch(self._pairs([batch]), num_micro_batches=1)
        self.engine.train()
        return loss.float().reshape(()).to(self.device)

    def pop_metrics(self, objective, training):
        """Only the last stage runs the objective, so its metrics go to every stage of its replica: the
        trainer's mean over all ranks is then the mean over replicas, as on the other layouts."""
        box = [{k: float(v) for k, v in objective_metrics(objective, training).items()}]
        grid = self.engine.grid
        last = grid.stage_to_global(stage_id=self.num_stages - 1, data=self.dp_rank, **_model_kw(grid))
        dist.broadcast_object_list(box, src=last, group=grid.get_pipe_parallel_group())
        return {k: torch.tensor(v, device=self.device) for k, v in box[0].items()}

    @torch.no_grad()
    def logits(self, input_ids):
        """Full logits on every rank: each replica passes activations stage to stage by point-to-point
        sends, then its last stage broadcasts the logits to the replica's other stages."""
        if not self.split.decoder:
            raise ValueError("logits for generation need a decoder pipeline (model.arch=gpt)")
        engine, grid = self.engine, self.engine.grid
        module = engine.module
        module.eval()
        try:
            x = input_ids.to(self.device)
            B, T = x.shape
            if self.stage > 0:
                x = torch.empty(B, T, self._width, device=self.device, dtype=_act_dtype(engine))
                dist.recv(x, src=grid.stage_to_global(stage_id=self.stage - 1, data=self.dp_rank, **_model_kw(grid)))
            for layer in module.forward_funcs:
                x = layer(x)
            x = full_logits(x) if self.stage == self.num_stages - 1 else x
            if self.stage < self.num_stages - 1:
                dist.send(x.contiguous(), dst=grid.stage_to_global(stage_id=self.stage + 1, data=self.dp_rank,
                                                                   **_model_kw(grid)))
                x = torch.empty(B, T, self._vocab, device=self.device, dtype=_act_dtype(engine))
            last = grid.stage_to_global(stage_id=self.num_stages - 1, data=self.dp_rank, **_model_kw(grid))
            dist.broadcast(x, src=last, group=grid.get_pipe_parallel_group())
            return x
        finally:
            module.train()

    def save(self, directory: Path) -> None:
        save_engine(self.engine, self.universal, directory)

    def load(self, directory: Path, load_optimizer: bool = True) -> None:
        load_engine(self.engine, self.universal, directory, load_optimizer)


def _model_kw(grid: Any) -> dict[str, int]:
    return {"model": grid.get_slice_parallel_rank()} if grid.get_slice_parallel_world_size() > 1 else {}


def _act_dtype(engine: Any) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else (torch.float16 if engine.fp16_enabled() else torch.float32)


def build_pipeline_runner(model: nn.Module, ds_config: dict[str, Any], optimizer_fn: Callable,
                          lr_lambda: Callable[[int], float], dims: ParallelDims, partition: str,
                          device: torch.device, universal: Any = None) -> PipelineRunner:
    """Split `model`, wrap the stages in DeepSpeed's PipelineEngine and return the runner."""
    from torch.optim.lr_scheduler import LambdaLR

    split = pipeline_split(model)
    # no loss function yet: train_step / eval_loss install the objective they are given
    module = build_pipeline_module(split, dims, partition, loss_fn=None)
    optimizer = optimizer_fn(module)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           lr_scheduler=LambdaLR(optimizer, lr_lambda), config=ds_config)
    return PipelineRunner(engine, split, device, width=model.cfg.n_embd, vocab=model.cfg.vocab_size,
                          universal=universal)
