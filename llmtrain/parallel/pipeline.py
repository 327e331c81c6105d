"""Pipeline parallel: a plain model split into DeepSpeed pipeline stages, and its runner.

The model file knows nothing of pipelines. Each family's spec (`llmtrain/models/<family>/pipeline.py`)
reads the plain model as a flat list of layers, outermost first, reusing the model's own (already
initialised) modules, so every layout starts from the same weights, and describes a weight shared between
the first and the last stage (a tied embedding and output head) as a `TiedLayer`. The DeepSpeed door
(`engine.pipeline_module`) builds those as `TiedLayerSpec`s: a copy on each of the two stages, its
gradient all-reduced between them, counted once in the gradient norm. A `PipelineSplit` bundles the
layers with how a micro-batch dict feeds them (first-stage inputs, last-stage labels) and how the
objective reads the labels back.

DeepSpeed runs the 1F1B schedule (`TrainSchedule`) over the gradient-accumulation micro-batches of one
optimizer step, so micro-batches per step = gradient accumulation = the number of micro-batches in
flight. DeepSpeed refuses ZeRO-2/3 with pipelines (gradients must stay whole across micro-batches);
`llmtrain.config.derive` says so before anything starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from llmtrain.models.objective import Objective, local_loss
from llmtrain.models.objective import pop_metrics as objective_metrics
from llmtrain.models.registry import family_of
from llmtrain.models.spec import PipelineSplit
from llmtrain.parallel.ds_compat import replace_fp32_clipping, stage_boundaries, stage_layers
from llmtrain.parallel.layout import ParallelDims, model_parallel_grad_norm
from llmtrain.parallel.runner import StepResult, load_engine, save_engine
from llmtrain.parallel.tensor_parallel import full_logits, loss_context
from llmtrain.utils import print0

if TYPE_CHECKING:
    from llmtrain.models.config import ModelConfig
    from llmtrain.parallel.universal import UniversalCheckpoint

__all__ = [
    "PARTITIONS",
    "PipelineSplit",
    "pipeline_split",
    "build_pipeline_module",
    "ObjectiveLoss",
    "PipelineRunner",
    "build_pipeline_runner",
]

# partition name in our config -> DeepSpeed's partition_method
PARTITIONS = {"parameters": "parameters", "layers": "type:Block"}


def pipeline_split(model: nn.Module) -> PipelineSplit:
    """The split of `model`'s family (its spec's `pipeline_split`)."""
    return family_of(model.cfg).pipeline_split(model)


def build_pipeline_module(split: PipelineSplit, dims: ParallelDims, partition: str, loss_fn: Callable | None) -> Any:
    """Split the layers into `dims.pp` stages over the layout's process topology (rank order: layout.py)."""
    from llmtrain.parallel.engine import pipeline_module

    if partition not in PARTITIONS:
        raise ValueError(f"pipeline partition must be one of {', '.join(PARTITIONS)}; got {partition!r}")
    layers = split.layers
    module = pipeline_module(layers, dims.ds_topology(), loss_fn=loss_fn, partition_method=PARTITIONS[partition])
    parts = stage_boundaries(module)
    stages = "; ".join(f"stage {i}: layers {a}-{b - 1}" for i, (a, b) in enumerate(zip(parts, parts[1:])))
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
        model = cast(nn.Module, lambda *_args: outputs)  # what the objective calls: the pipeline's outputs
        loss = self.objective(model, self.as_batch(labels))
        return local_loss(loss)  # DeepSpeed sums and all-reduces plain tensors


class PipelineRunner:
    """Pipeline (x data) parallel with ZeRO 0/1: DeepSpeed's PipelineEngine runs 1F1B per optimizer step."""

    def __init__(
        self,
        engine: Any,
        split: PipelineSplit,
        device: torch.device,
        width: int,
        vocab: int,
        universal: UniversalCheckpoint | None = None,
    ):
        self.engine, self.split, self.device, self.universal = engine, split, device, universal
        self._width, self._vocab = width, vocab  # shapes of the activations and logits sent between stages
        grid = engine.grid
        self.dp_rank, self.dp_size = grid.get_data_parallel_id(), grid.get_data_parallel_world_size()
        self.stage, self.num_stages = grid.get_stage_id(), engine.num_stages
        self.tp = grid.get_slice_parallel_world_size()
        self._norm: float | None = None
        if engine.gradient_clipping() > 0 and not (
            engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled()
        ):
            self._record_fp32_norm()

    def _record_fp32_norm(self) -> None:
        # ZeRO-0 fp32 clips through engine.clip_fp32_gradients, whose DeepSpeed norm counts only the
        # parameters of the first stage (it treats pipeline stages like tensor-parallel ranks that
        # replicate unmarked parameters) and drops the result. Clip here instead, the way the one-rank
        # engine does: norm over every stage, tied copies counted once, coef = max / (norm + 1e-6).
        engine = self.engine

        def clip_and_record() -> None:
            params = [p for p in engine.module.parameters() if p.grad is not None]
            self._norm = model_parallel_grad_norm(
                params, engine.mpu.get_model_parallel_group(), engine.grid.get_slice_parallel_rank()
            )
            coef = min(1.0, engine.gradient_clipping() / (self._norm + 1e-6))
            for p in params:
                p.grad.mul_(coef)

        replace_fp32_clipping(engine, clip_and_record)

    def _pairs(self, micro_batches: list[dict[str, torch.Tensor]]) -> Any:
        return iter([(self.split.inputs(mb), self.split.labels(mb)) for mb in micro_batches])

    def train_step(self, objective, micro_batches, measure_norm, stop_requested=False):
        # no collective of ours here to carry the stop agreement: StepResult.stop stays None
        if (
            not isinstance(self.engine.module.loss_fn, ObjectiveLoss)
            or self.engine.module.loss_fn.objective is not objective
        ):
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
            raise ValueError("logits for generation need a decoder pipeline (a generative model family)")
        engine, grid = self.engine, self.engine.grid
        module = engine.module
        module.eval()
        try:
            x = input_ids.to(self.device)
            B, T = x.shape
            if self.stage > 0:
                x = torch.empty(B, T, self._width, device=self.device, dtype=_act_dtype(engine))
                dist.recv(x, src=grid.stage_to_global(stage_id=self.stage - 1, data=self.dp_rank, **_model_kw(grid)))
            for layer in stage_layers(module):
                x = layer(x)
            x = full_logits(x) if self.stage == self.num_stages - 1 else x
            if self.stage < self.num_stages - 1:
                dist.send(
                    x.contiguous(),
                    dst=grid.stage_to_global(stage_id=self.stage + 1, data=self.dp_rank, **_model_kw(grid)),
                )
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


def build_pipeline_runner(
    model: nn.Module,
    ds_config: dict[str, Any],
    optimizer_fn: Callable,
    lr_lambda: Callable[[int], float],
    dims: ParallelDims,
    partition: str,
    device: torch.device,
    universal: UniversalCheckpoint | None = None,
) -> PipelineRunner:
    """Split `model`, wrap the stages in DeepSpeed's PipelineEngine and return the runner."""
    from torch.optim.lr_scheduler import LambdaLR

    from llmtrain.parallel.engine import initialize_pipeline

    split = pipeline_split(model)
    # no loss function yet: train_step / eval_loss install the objective they are given
    module = build_pipeline_module(split, dims, partition, loss_fn=None)
    optimizer = optimizer_fn(module)
    engine = initialize_pipeline(module, optimizer, LambdaLR(optimizer, lr_lambda), ds_config)
    model_cfg = cast("ModelConfig", model.cfg)
    return PipelineRunner(
        engine, split, device, width=model_cfg.n_embd, vocab=model_cfg.vocab_size, universal=universal
    )
