"""Run by test_distill.py under `torchrun --nproc_per_node 2`: the vocabulary-parallel log-softmax and the
tensor-parallel KD losses against their single-process forms, values and gradients (the student's logits
split by vocabulary over the 2 ranks as VocabParallelHead splits them). Exits non-zero on the first mismatch."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llmtrain.compress.distill import kd_kl, sharded_kd_kl, sharded_topk_kd_kl, topk_kd_kl
from llmtrain.parallel.tensor_parallel import vocab_parallel_log_softmax

N, V, K, TAU = 6, 10, 4, 2.0
# fp32 sums over the vocabulary in two halves instead of one pass: a few ulps apart
TOL = dict(atol=1e-6, rtol=1e-5)


def main() -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(size)))
    width = V // size
    cols = slice(rank * width, (rank + 1) * width)
    g = torch.Generator().manual_seed(0)  # the same inputs on every rank
    x = torch.randn(N, V, generator=g) * 3
    teacher = torch.randn(N, V, generator=g) * 3
    upstream = torch.randn(N, V, generator=g)
    keep = torch.tensor([True, True, False, True, True, False])  # rows 2 and 5 are not scored

    def local_leaf() -> torch.Tensor:
        return x[:, cols].clone().requires_grad_(True)

    # log-softmax: values and the gradient of an arbitrary upstream gradient
    full = x.clone().requires_grad_(True)
    F.log_softmax(full, dim=-1).backward(upstream)
    part = local_leaf()
    out = vocab_parallel_log_softmax(part, group)
    out.backward(upstream[:, cols])
    torch.testing.assert_close(out, F.log_softmax(x, dim=-1)[:, cols], **TOL)
    torch.testing.assert_close(part.grad, full.grad[:, cols], **TOL)

    # full KD over the scored rows
    full = x.clone().requires_grad_(True)
    ref = kd_kl(full[keep], teacher[keep], TAU)
    ref.backward()
    part = local_leaf()
    got = sharded_kd_kl(part, teacher, keep.float(), TAU, group)
    got.backward()
    torch.testing.assert_close(got, ref.detach(), **TOL)
    torch.testing.assert_close(part.grad, full.grad[:, cols], **TOL)

    # cached top-k KD: indices into the whole vocabulary, some on each rank
    logprobs, indices = F.log_softmax(teacher / TAU, dim=-1).topk(K, dim=-1)
    assert (indices < width).any() and (indices >= width).any()
    full = x.clone().requires_grad_(True)
    ref = topk_kd_kl(full[keep], logprobs[keep], indices[keep].int(), TAU)
    ref.backward()
    part = local_leaf()
    got = sharded_topk_kd_kl(part, logprobs, indices.int(), keep.float(), TAU, group)
    got.backward()
    torch.testing.assert_close(got, ref.detach(), **TOL)
    torch.testing.assert_close(part.grad, full.grad[:, cols], **TOL)
    if rank == 0:
        print(f"vocab-parallel log-softmax, KD and top-k KD match one process on {size} ranks", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as tp_layers_worker.py: skip the interpreter shutdown that once raced gloo's threads


if __name__ == "__main__":
    main()
