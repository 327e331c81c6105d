"""ParallelDims: one object for the layout, built by derive(); the rank order the golden tests rely on."""

import pytest

from llmtrain.config import ConfigError, derive, load_config
from llmtrain.parallel.layout import AXES, Coords, ParallelDims


def test_rank_order_is_pipe_data_model_model_fastest():
    dims = ParallelDims.for_world(8, tp=2, pp=2)
    assert (dims.dp, dims.tp, dims.pp, dims.cp, dims.ep) == (2, 2, 2, 1, 1)
    assert AXES == ("pp", "dp", "cp", "tp") and dims.shape == (2, 2, 1, 2) and dims.world_size == 8
    for rank in range(8):  # rank = (pipe * dp + data) * tp + model, DeepSpeed's PipeModelDataParallelTopology order
        c = dims.coords(rank)
        assert rank == (c.pp * dims.dp + c.dp) * dims.tp + c.tp == dims.rank_of(c)
    assert dims.coords(5) == Coords(dp=0, pp=1, tp=1)
    assert dims.describe().startswith("stage 0: ranks 0-3; stage 1: ranks 4-7")
    with pytest.raises(ValueError, match="outside a world"):
        dims.coords(8)


def test_derive_builds_the_layout_once_and_refuses_bad_worlds():
    derived = derive(load_config(None, ["parallel.tp=2", "train.micro_batch_size=2", "train.global_batch_size=4"]), 4)
    assert derived.dims == ParallelDims(dp=2, tp=2, pp=1) and derived.dp_size == derived.dims.dp == 2
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by parallel.tp\*parallel.pp = 2\*1"):
        ParallelDims.for_world(3, tp=2)
    assert ParallelDims.for_world(4, ep=2) == ParallelDims(dp=4, ep=2)  # ep folds over dp: no new mesh axis
    with pytest.raises(ConfigError, match="parallel.ep=4 does not divide the data-parallel size 2"):
        ParallelDims.for_world(4, tp=2, ep=4)
    with pytest.raises(ValueError, match="axis tp must be an int >= 1"):
        ParallelDims(dp=1, tp=0)
