"""The parallel layout: one frozen `ParallelDims` object says how the world is cut into axes.

`llmtrain.config.derive` builds it once from `parallel.*` and the world size; everything that needs a
rank's place, a process group, the device mesh or DeepSpeed's process topology asks it, so the axes
travel as one object and never as loose integers in different orders.

One rank order for every runner, the same as DeepSpeed's `PipeModelDataParallelTopology` (axes pipe,
data, model; the last varies fastest) with the context-parallel axis between data and model:

    rank = ((pipe * dp + data) * cp + context) * tp + model

Tensor-parallel ranks are neighbours (on GPUs: inside one node, where their per-layer all-reduces are
cheapest), then context-parallel ranks (the ring of one sequence's chunks), then data-parallel replicas,
then pipeline stages. With cp = 1 the order is DeepSpeed's. The trainer asks for the data-parallel rank
before anything is built, so it picks the right slice of each global batch (every cp rank of a replica
gets the same samples and keeps its own chunks of them: llmtrain/parallel/context_parallel.py).

`ep` (expert parallel, llmtrain/parallel/expert_parallel.py) folds over data parallel and adds no mesh axis:
ep consecutive data-parallel replicas form one expert-parallel group (`ep_group`), exchanging tokens so that
each computes num_experts/ep of every MoE block's experts. The rank order does not change with ep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Mesh axes, outermost first (the last varies fastest). The one place the rank order is written down:
# coords, rank_of, the device mesh and DeepSpeed's topology all follow it.
AXES = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class Coords:
    """This rank's position: data-parallel replica, pipeline stage, tensor-parallel shard, context chunk."""

    dp: int
    pp: int
    tp: int
    cp: int = 0


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the parallel axes; their product is the world size. Build it with `for_world`."""

    dp: int
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallel: each sequence split over ranks (llmtrain/parallel/context_parallel.py)
    ep: int = 1  # expert parallel: MoE experts' computation split over ep dp replicas (expert_parallel.py)
    # Process groups, the mesh and DeepSpeed's grid, made on first use (creating them is collective)
    _built: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        for axis in ("dp", "tp", "pp", "cp", "ep"):
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"parallel axis {axis} must be an int >= 1; got {size!r}")
        if self.dp % self.ep:
            raise ValueError(f"ep={self.ep} must divide dp={self.dp} (expert parallel folds over data parallel)")

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1) -> ParallelDims:
        """The layout for `world_size` ranks: data parallel takes what the model-parallel axes leave.
        Raises ConfigError naming the `parallel.*` keys to change."""
        from llmtrain.errors import ConfigError

        model_par = tp * pp * cp
        if world_size < 1 or world_size % model_par:
            keys, sizes = (
                ("tp*parallel.pp*parallel.cp", f"{tp}*{pp}*{cp}") if cp > 1 else ("tp*parallel.pp", f"{tp}*{pp}")
            )
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.{keys} = {sizes}; "
                f"launch a multiple of {model_par} processes or change tp/pp{'/cp' if cp > 1 else ''}"
            )
        if (world_size // model_par) % ep:
            raise ConfigError(
                f"parallel.ep={ep} does not divide the data-parallel size {world_size // model_par} (expert "
                f"parallel groups are ep consecutive data-parallel replicas); launch a multiple of "
                f"{model_par * ep} processes or change parallel.ep"
            )
        return cls(dp=world_size // model_par, tp=tp, pp=pp, cp=cp, ep=ep)

    @property
    def world_size(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def shape(self) -> tuple[int, ...]:
        """Axis sizes in `AXES` order (the device mesh's shape)."""
        return tuple(getattr(self, axis) for axis in AXES)

    def coords(self, rank: int) -> Coords:
        """Where `rank` sits on each axis."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of tp*cp*pp*dp = {self.tp}*{self.cp}*{self.pp}*{self.dp}")
        tp_cp = self.tp * self.cp
        return Coords(
            dp=(rank // tp_cp) % self.dp,
            pp=rank // (tp_cp * self.dp),
            tp=rank % self.tp,
            cp=(rank // self.tp) % self.cp,
        )

    def rank_of(self, c: Coords) -> int:
        return ((c.pp * self.dp + c.dp) * self.cp + c.cp) * self.tp + c.tp

    def describe(self) -> str:
        """One line naming which ranks form each stage and replica, for the start-up banner."""
        stages = []
        for s in range(self.pp):
            ranks = [
                self.rank_of(Coords(d, s, t, c)) for d in range(self.dp) for c in range(self.cp) for t in range(self.tp)
            ]
            stages.append(
                f"stage {s}: ranks {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"stage {s}: rank {ranks[0]}"
            )
        if self.ep > 1:  # only with tp = pp = cp = 1 (config.py:_check_moe)
            return "; ".join(stages) + f" (dp replicas on every rank, ep groups of {self.ep} adjacent ranks)"
        if self.cp == 1:
            return "; ".join(stages) + f" (tp groups of {self.tp} adjacent ranks, dp replicas every {self.tp} ranks)"
        return "; ".join(stages) + (
            f" (tp groups of {self.tp} adjacent ranks, cp rings of {self.cp} every {self.tp} ranks, dp replicas "
            f"every {self.tp * self.cp} ranks)"
        )

    def as_dict(self) -> dict[str, int]:
        """The axis sizes, as checkpoints record the layout they were saved from (cp only when > 1, so the
        layouts recorded before the axis existed still compare equal)."""
        return {
            "tp": self.tp,
            "pp": self.pp,
            "dp": self.dp,
            **({"cp": self.cp} if self.cp > 1 else {}),
            **({"ep": self.ep} if self.ep > 1 else {}),
        }

    # -- process groups: collective on first call (every rank must call them in the same order) --

    def mesh(self, device_type: str) -> Any:
        """torch's DeviceMesh over every axis (names `AXES`); `mesh(d)["tp"]` is this rank's TP mesh."""
        key = f"mesh:{device_type}"
        if key not in self._built:
            from torch.distributed.device_mesh import init_device_mesh

            self._built[key] = init_device_mesh(device_type, self.shape, mesh_dim_names=AXES)
        return self._built[key]

    def tp_group(self, device_type: str) -> tuple[Any, Any]:
        """(process group, 1-D device mesh) of this rank's tensor-parallel peers; (None, None) when tp = 1."""
        if self.tp == 1:
            return None, None
        mesh = self.mesh(device_type)["tp"]
        return mesh.get_group(), mesh

    def cp_group(self) -> tuple[Any, list[int]]:
        """(process group, its global ranks in ring order) of this rank's context-parallel peers: the cp
        ranks of one data-parallel replica (and tensor-parallel shard). Collective on first call."""
        if "cp_group" not in self._built:
            import torch.distributed as dist

            me = dist.get_rank()
            mine: tuple[Any, list[int]] = (None, [me])
            for pp in range(self.pp):  # every rank creates every group, in the same order
                for dp in range(self.dp):
                    for tp in range(self.tp):
                        ranks = [self.rank_of(Coords(dp, pp, tp, c)) for c in range(self.cp)]
                        group = dist.new_group(ranks)
                        if me in ranks:
                            mine = (group, ranks)
            self._built["cp_group"] = mine
        return self._built["cp_group"]

    def ep_group(self) -> tuple[Any, list[int]]:
        """(process group, its global ranks) of this rank's expert-parallel peers: ep consecutive data-parallel
        replicas of one pipeline stage, tensor-parallel shard and context chunk. Collective on first call."""
        if "ep_group" not in self._built:
            import torch.distributed as dist

            me = dist.get_rank()
            mine: tuple[Any, list[int]] = (None, [me])
            for pp in range(self.pp):  # every rank creates every group, in the same order
                for c in range(self.cp):
                    for tp in range(self.tp):
                        for first in range(0, self.dp, self.ep):
                            ranks = [self.rank_of(Coords(d, pp, tp, c)) for d in range(first, first + self.ep)]
                            group = dist.new_group(ranks)
                            if me in ranks:
                                mine = (group, ranks)
            self._built["ep_group"] = mine
        return self._built["ep_group"]

    def ds_topology(self) -> Any:
        """DeepSpeed's process topology for this layout (what its PipelineModule takes)."""
        from llmtrain.parallel.engine import process_topology

        return process_topology(self)

    def ds_grid(self) -> Any:
        """DeepSpeed's process grid (its `mpu`: data-parallel and model-parallel groups) for this layout."""
        if "ds_grid" not in self._built:
            from llmtrain.parallel.engine import process_grid

            self._built["ds_grid"] = process_grid(self)
        return self._built["ds_grid"]


def counted_in_norm(param, tp_rank: int) -> bool:
    """Whether this rank adds `param`'s gradient to a norm summed over its model-parallel group: a
    tensor-parallel shard always, a full copy only on TP rank 0 (DeepSpeed's rule, same attribute)."""
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def model_parallel_grad_norm(params: list, model_parallel_group=None, tp_rank: int = 0) -> float:
    """Global L2 gradient norm of a model split over the ranks of `model_parallel_group` (its pipeline
    stages and tensor-parallel shards): shards counted on every rank, full copies on TP rank 0 only,
    copies of tied weights on later pipeline stages (DeepSpeed's `ds_pipe_replicated`) not at all.
    Without a group: the norm of this rank's whole model.

    The sum of squares is taken as `g.pow(2).sum()` on purpose: torch's float32 `vector_norm` on CPU
    (what `clip_grad_norm_` / `get_total_norm` call) was measured 1-3e-5 relatively low on a sparse
    embedding gradient (0.58212 vs 0.58224 in float64), while this sum agrees with float64 to ~1e-7 — so
    every layout reports the same norm for the same gradients."""
    import torch
    import torch.distributed as dist

    from llmtrain.parallel.ds_compat import is_pipe_replicated

    sq = torch.zeros((), dtype=torch.float32, device=params[0].device if params else None)
    for p in params:
        if not is_pipe_replicated(p) and counted_in_norm(p, tp_rank):
            sq += p.grad.detach().float().pow(2).sum()
    if model_parallel_group is not None:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=model_parallel_group)
    return sq.sqrt().item()
