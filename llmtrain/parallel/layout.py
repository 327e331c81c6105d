"""Where each rank sits in the TP x PP x DP grid.

One rank order for every runner, the same as DeepSpeed's `PipeModelDataParallelTopology` (axes pipe,
data, model; the last varies fastest):

    rank = (pipe * dp + data) * tp + model

Tensor-parallel ranks are neighbours (on GPUs: inside one node, where their per-layer all-reduces are
cheapest), then data-parallel replicas, then pipeline stages. The trainer asks this module for the
data-parallel rank before anything is built, so it picks the right slice of each global batch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Coords:
    """This rank's position: data-parallel replica, pipeline stage, tensor-parallel shard."""

    dp: int
    pp: int
    tp: int


def coords(rank: int, tp: int, pp: int, dp: int) -> Coords:
    if not 0 <= rank < tp * pp * dp:
        raise ValueError(f"rank {rank} is outside a world of tp*pp*dp = {tp}*{pp}*{dp}")
    return Coords(dp=(rank // tp) % dp, pp=rank // (tp * dp), tp=rank % tp)


def rank_of(c: Coords, tp: int, pp: int, dp: int) -> int:
    return (c.pp * dp + c.dp) * tp + c.tp


def describe(tp: int, pp: int, dp: int) -> str:
    """One line naming which ranks form each stage and replica, for the start-up banner."""
    stages = []
    for s in range(pp):
        ranks = [rank_of(Coords(d, s, t), tp, pp, dp) for d in range(dp) for t in range(tp)]
        stages.append(f"stage {s}: ranks {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"stage {s}: rank {ranks[0]}")
    return "; ".join(stages) + f" (tp groups of {tp} adjacent ranks, dp replicas every {tp} ranks)"


# Set on the parameters that a tensor-parallel rank other than 0 holds as a full copy (norms, biases
# of row-parallel layers, positions): gradient norms over the model-parallel group count them once.
TP_REPLICA = "llmtrain_tp_replica"


def counted_in_norm(param) -> bool:
    """Whether this rank adds `param`'s gradient to a norm summed over its model-parallel group."""
    return not getattr(param, TP_REPLICA, False)
