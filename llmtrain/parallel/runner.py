"""Runners: how one optimizer step, one eval forward and one checkpoint happen on a given layout.

The trainer talks only to a Runner, so data parallel + ZeRO, pipeline and tensor parallel are
different runners, not `if` branches in the loop. `llmtrain.parallel.parallelize.build_runner` picks one
from the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from llmtrain.models.objective import Objective, local_loss, pop_metrics

if TYPE_CHECKING:
    from llmtrain.parallel.universal import UniversalCheckpoint

ENGINE_TAG = "state"  # DeepSpeed's tag directory inside one of our checkpoint directories


class StepResult(NamedTuple):
    loss: torch.Tensor  # mean loss over this rank's micro-batches (detached)
    grad_norm: float | None  # global norm before clipping, when measured
    skipped: bool  # the update was skipped on every rank: the loss was not finite somewhere
    # Whether some rank was asked to stop, agreed by the step's own all-reduce (None: not carried; the
    # trainer then agrees with a collective of its own)
    stop: bool | None = None


def all_ranks_agree(value: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """Collective, one all-reduce: (`value` is finite on every rank, some rank was asked to stop)."""
    import torch.distributed as dist

    flag = torch.stack([torch.isfinite(value).float(), torch.full_like(value, 0.0 if stop_requested else 1.0)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    finite, go_on = flag.tolist()
    return finite == 1.0, go_on == 0.0


class Runner(Protocol):
    engine: Any  # the DeepSpeed engine (checkpoints check its optimizer state)
    device: torch.device
    dp_rank: int
    dp_size: int

    def train_step(
        self,
        objective: Objective,
        micro_batches: list[dict[str, torch.Tensor]],
        measure_norm: bool,
        stop_requested: bool = False,
    ) -> StepResult:
        """One optimizer step over the accumulation micro-batches. When the loss is not finite on any
        rank, every rank skips the parameter update (weights and optimizer moments stay as they were).
        `stop_requested`: this rank got a stop signal; a runner whose step has a collective anyway may agree on
        it there (`StepResult.stop`), saving the trainer one synchronisation per step."""
        ...

    def eval_loss(self, objective: Objective, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss of one held-out micro-batch (no grad)."""
        ...

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full logits (B, T, V) on every rank, for generation; all ranks call it in lockstep."""
        ...

    def pop_metrics(self, objective: Objective, training: bool) -> dict[str, torch.Tensor]:
        """Collective: the objective's metrics since the last pop (`objectives.pop_metrics`), the same keys
        on every rank."""
        ...

    def save(self, directory: Path) -> None:
        """Collective: write this rank's share of model, optimizer and LR-schedule state."""
        ...

    def load(self, directory: Path, load_optimizer: bool = True) -> None:
        """Collective: restore what `save` wrote."""
        ...


class EngineRunner:
    """Data parallel with ZeRO 0-3: one DeepSpeed engine over the whole model."""

    def __init__(
        self,
        engine: Any,
        optimizer: Any,
        device: torch.device,
        dp_rank: int,
        dp_size: int,
        tp: int = 1,
        mpu: Any = None,
        universal: UniversalCheckpoint | None = None,
        ep_group: Any = None,
    ):
        self.engine, self.optimizer = engine, optimizer
        self.device, self.dp_rank, self.dp_size = device, dp_rank, dp_size
        self.tp, self.mpu = tp, mpu  # with tp > 1: the grid whose model-parallel group holds the shards
        self.universal = universal  # UniversalCheckpoint: resume on another layout
        self.ep_group = ep_group  # parallel.ep > 1: the ranks whose expert slices make the whole experts
        from llmtrain.parallel.engine import grad_norm_unreported

        if ep_group is not None and engine.gradient_clipping() > 0 and grad_norm_unreported(engine):
            # ZeRO-0 fp32 clips with DeepSpeed's clip_grad_norm_, which averages the ranks' local norms (they
            # differ, each rank holding other experts): clip with the global norm instead
            from llmtrain.parallel.ds_compat import replace_fp32_clipping

            replace_fp32_clipping(engine, self._clip_fp32)
        elif engine.mpu is None and engine.gradient_clipping() > 0 and grad_norm_unreported(engine):
            from llmtrain.parallel.ds_compat import replace_fp32_clipping

            replace_fp32_clipping(engine, self._clip_fp32_replicated)

    def _clip_fp32_replicated(self) -> None:
        """DeepSpeed's ZeRO-0 fp32 clipping (`deepspeed.runtime.utils.clip_grad_norm_`) less its all-reduce.

        Same arithmetic: each gradient's L2 norm, the root of the sum of their squares, coefficient
        min(1, max_norm / (norm + 1e-6)) multiplied into every gradient. DeepSpeed then averages the norm over
        the data-parallel ranks for the sake of MoE, whose expert gradients differ between ranks (that case
        has `_clip_fp32`). Here every rank holds the same all-reduced gradients, so the average is the norm
        itself (bit for bit at 1 and 2 ranks, within an ulp beyond) and the all-reduce was one more point per
        step where every rank waits for the slowest. The per-gradient loops become foreach calls
        (the same kernels, the same bits)."""
        grads = [p.grad.detach() for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.stack(torch._foreach_norm(grads, 2.0)).pow(2.0).sum().float().pow(0.5)
        max_norm = torch.tensor([float(self.engine.gradient_clipping())], device=norm.device)
        coef = torch.min(torch.ones(1, device=norm.device), max_norm / (norm + 1e-6))
        torch._foreach_mul_(grads, coef.reshape(()))

    def _clip_fp32(self) -> None:
        norm = self._local_grad_norm()
        coef = min(1.0, self.engine.gradient_clipping() / (norm + 1e-6))
        for p in self.engine.module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)

    def train_step(self, objective, micro_batches, measure_norm, stop_requested=False):
        from llmtrain.parallel.engine import grad_norm_unreported, reported_grad_norm
        from llmtrain.parallel.tensor_parallel import loss_context

        engine = self.engine
        total, norm, skipped, stop = torch.zeros((), device=self.device), None, False, None
        for i, mb in enumerate(micro_batches):
            with loss_context(self.tp):  # vocab-parallel cross-entropy, forward and backward
                loss = local_loss(objective(engine, _to(mb, self.device)))
                engine.backward(loss)
            total += loss.detach().float()
            if i == len(micro_batches) - 1:  # the boundary: engine.step() below updates the weights
                finite, stop = all_ranks_agree(total, stop_requested)
                skipped = not finite
                self.optimizer.skip_next = skipped
                if measure_norm and grad_norm_unreported(engine):
                    norm = self._local_grad_norm()
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        if measure_norm and norm is None:
            norm = reported_grad_norm(engine)
        return StepResult(total / len(micro_batches), norm, skipped, stop)

    def _local_grad_norm(self) -> float:
        from llmtrain.parallel.layout import model_parallel_grad_norm

        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        if self.ep_group is not None:
            from llmtrain.parallel.expert_parallel import expert_parallel_grad_norm

            return expert_parallel_grad_norm(params, self.ep_group)
        if self.tp == 1:
            return model_parallel_grad_norm(params)  # gradients already averaged over the dp ranks
        return model_parallel_grad_norm(params, self.mpu.get_model_parallel_group(), self.mpu.get_slice_parallel_rank())

    @torch.no_grad()
    def eval_loss(self, objective, batch):
        from llmtrain.parallel.tensor_parallel import loss_context

        self.engine.eval()
        try:
            with loss_context(self.tp):
                return local_loss(objective(self.engine, _to(batch, self.device))).float()
        finally:
            self.engine.train()

    def pop_metrics(self, objective, training):
        return pop_metrics(objective, training)  # every rank ran the objective

    @torch.no_grad()
    def logits(self, input_ids):
        from llmtrain.parallel.tensor_parallel import full_logits

        self.engine.eval()
        try:
            return full_logits(self.engine(input_ids.to(self.device)))
        finally:
            self.engine.train()

    def save(self, directory: Path) -> None:
        save_engine(self.engine, self.universal, directory)

    def load(self, directory: Path, load_optimizer: bool = True) -> None:
        load_engine(self.engine, self.universal, directory, load_optimizer)


def save_engine(engine: Any, universal: UniversalCheckpoint | None, directory: Path) -> None:
    """DeepSpeed's own state (for DeepSpeed's tools; never read back) and the layout-independent copy
    beside it (what every resume reads). A failed write raises only after the collectives of both saves,
    so no peer is left waiting in one."""
    from llmtrain.parallel.ds_compat import deferred_write_errors

    errors: list[BaseException] = []
    with deferred_write_errors(engine, errors):
        # frozen weights (a LoRA base) are not state: the universal copy points at their base instead
        engine.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    if universal is not None:
        universal.save(engine, directory)
    if errors:
        raise errors[0]


def load_engine(engine: Any, universal: UniversalCheckpoint | None, directory: Path, load_optimizer: bool) -> None:
    """Restore from the checkpoint's universal/ (safetensors + JSON) on every layout, the saved one too.

    DeepSpeed's state/*.pt files are pickles that engine.load_checkpoint reads with weights_only=False, so
    a payload planted in one would run: they are written (DeepSpeed's tools read them) but never read."""
    if universal is None:
        raise RuntimeError("this runner has no UniversalCheckpoint to resume from (parallelize.build_runner gives one)")
    universal.load(engine, directory, load_optimizer)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
