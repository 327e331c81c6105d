"""`train.eval_tasks`: lm-eval tasks scored at every held-out evaluation of a run (and of distillation).

Where each rank's forward is its own (data parallel over whole replicas: ZeRO 0-2, no tensor or pipeline
split) the documents are sharded over the ranks, as `llmtrain eval --tasks` under torchrun does: rank 0
gathers the per-document metrics and sends the results to every rank. Otherwise every rank runs every
request through the runner's `logits` (the collective forward that works on any layout: ZeRO-3, tensor or
pipeline parallel), so all ranks compute the same accuracies. Either way the figures equal one rank's. The
tasks' names are checked before step 1, so a typo never costs a training run.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmtrain.config import ParallelConfig, TrainConfig
    from llmtrain.data.tokenizer import Tokenizer
    from llmtrain.models.config import ModelConfig
    from llmtrain.parallel.runner import Runner


def check_eval_tasks(train_cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """UserError before training when train.eval_tasks names an unknown task, lm-eval is missing or the
    model is not a decoder."""
    if not train_cfg.eval_tasks:
        return
    from llmtrain.errors import UserError
    from llmtrain.evaluation.run import task_manager
    from llmtrain.models.registry import family_of

    if not family_of(model_cfg).generative:
        raise UserError(
            f"train.eval_tasks needs a decoder; model.arch={model_cfg.arch} is not one: set train.eval_tasks=[]"
        )
    try:
        task_manager(train_cfg.eval_tasks)
    except UserError as exc:
        raise UserError(f"train.eval_tasks: {exc}") from None


@functools.cache
def _say_once(line: str) -> None:
    print(line, flush=True)


def shards_documents(parallel: ParallelConfig) -> bool:
    """True when train.eval_tasks can give each rank its own documents: more than one rank, and each rank's
    forward its own (ZeRO 0-2, no tensor, pipeline or context split; ZeRO-3 gathers parameters collectively)."""
    import torch.distributed as dist

    split = parallel.zero_stage == 3 or parallel.tp > 1 or parallel.pp > 1 or parallel.cp > 1
    return not split and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def eval_task_metrics(
    train_cfg: TrainConfig, block_size: int, runner: Runner, tokenizer: Tokenizer, shard: bool = False
) -> dict[str, float]:
    """{'eval_<task>_<metric>': value} of train.eval_tasks on the model being trained ({} when none), the same
    on every rank. `shard` (see `shards_documents`): each rank scores its share of the documents."""
    if not train_cfg.eval_tasks:
        return {}
    import torch.distributed as dist

    from llmtrain.evaluation.harness import LlmtrainLM
    from llmtrain.evaluation.run import evaluate_tasks, flat_metrics

    lm = LlmtrainLM(
        runner.logits, tokenizer, block_size, runner.device, batch_size=train_cfg.micro_batch_size, shard=shard
    )
    if lm.world_size > 1 and lm.rank == 0:
        _say_once(f"train.eval_tasks: the documents are sharded over {lm.world_size} data-parallel ranks")
    results = evaluate_tasks(lm, train_cfg.eval_tasks, limit=train_cfg.eval_tasks_limit or None)
    flat = flat_metrics(results) if results is not None else None
    if lm.world_size > 1:  # sharded: rank 0 alone has the results
        box = [flat]
        dist.broadcast_object_list(box, src=0)
        flat = box[0]
    assert flat is not None
    return {f"eval_{k}": v for k, v in flat.items()}
