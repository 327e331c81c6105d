"""`train.eval_tasks`: lm-eval tasks scored at every held-out evaluation of a run (and of distillation).

Every rank runs every request through the runner's `logits` (the collective forward that works on any
layout: ZeRO-3, tensor or pipeline parallel), so all ranks compute the same accuracies and no results
need gathering. The tasks' names are checked before step 1, so a typo never costs a training run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmtrain.config import TrainConfig
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


def eval_task_metrics(
    train_cfg: TrainConfig, block_size: int, runner: Runner, tokenizer: Tokenizer
) -> dict[str, float]:
    """{'eval_<task>_<metric>': value} of train.eval_tasks on the model being trained ({} when none)."""
    if not train_cfg.eval_tasks:
        return {}
    from llmtrain.evaluation.harness import LlmtrainLM
    from llmtrain.evaluation.run import evaluate_tasks, flat_metrics

    lm = LlmtrainLM(runner.logits, tokenizer, block_size, runner.device, batch_size=train_cfg.micro_batch_size)
    results = evaluate_tasks(lm, train_cfg.eval_tasks, limit=train_cfg.eval_tasks_limit or None)
    assert results is not None  # an unsharded LM: every rank has the results
    return {f"eval_{k}": v for k, v in flat_metrics(results).items()}
