"""Context parallel: the longest sequence whose activations fit a fixed per-rank budget, at cp 1, 2 and 4.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/context_parallel.py [--cp 1 2 4] [--budget-mib 64] [--out FILE]

For each cp, one torchrun of cp ranks over gloo runs the forward of a training step (the causal LM loss of
one sequence, micro-batch 1) of a small Llama-flavour decoder (RoPE, fp32) at growing sequence lengths and
counts the bytes autograd keeps for backward on each rank, as benchmarks/zero_memory.py does
(`llmtrain.parallel.checkpointing.SavedBytes`: unique storages, parameters excluded). cp 1 is the plain
model (SDPA's flash kernel on CPU: no attention matrix kept); cp > 1 is llmtrain's ring attention
(`llmtrain/parallel/context_parallel.py`), whose saved tensors are the local q, k, v, output and
log-sum-exp. The figure is the largest rank's count. The ring's blocks in flight (two chunks of keys and
values being passed on) are transient, not kept for backward, and not counted; neither are model states
(the same on every cp rank; ZeRO shards them over dp x cp).

The longest sequence fitting the budget is read off the measured lengths (steps of 1.5x/1.33x between
powers of two), so it is a lower bound within one step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(
    arch="gpt",
    n_layer=2,
    n_head=4,
    n_kv_head=4,
    n_embd=128,
    vocab_size=2048,
    pos="rope",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    dropout=0.0,
)
LENGTHS = [1024, 1536, 2048, 3072, 4096, 6144, 8192]


def measure(seq: int, cp_state: Any) -> int:
    """Bytes kept for backward by this rank's forward + loss of one sequence of `seq` tokens."""
    from llmtrain.models import ModelConfig, build_model
    from llmtrain.models.gpt.objective import CausalLM
    from llmtrain.parallel.checkpointing import SavedBytes
    from llmtrain.parallel.context_parallel import ContextParallelObjective, apply_context_parallel

    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**MODEL, "block_size": seq}))
    model.init_weights()
    objective: Any = CausalLM()
    if cp_state is not None:
        apply_context_parallel(model, cp_state)
        objective = ContextParallelObjective(objective, cp_state)
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, MODEL["vocab_size"], (1, seq + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    with SavedBytes(exclude=list(model.parameters())) as saved:
        loss = objective(model, batch)
    del loss, model
    gc.collect()
    return saved.bytes


def worker(out: Path, lengths: list[int]) -> None:
    import torch.distributed as dist

    from llmtrain.parallel.context_parallel import ContextParallel, process_group_shift
    from llmtrain.parallel.engine import init_distributed
    from llmtrain.parallel.layout import ParallelDims

    init_distributed()
    cp = dist.get_world_size()
    cp_state = None
    if cp > 1:
        group, ranks = ParallelDims(dp=1, cp=cp).cp_group()
        me = ranks.index(dist.get_rank())
        cp_state = ContextParallel(me, cp, process_group_shift(group, ranks, me))
    rows = []
    for seq in lengths:
        mine = measure(seq, cp_state)
        everyone: list[Any] = [None] * cp
        dist.all_gather_object(everyone, mine)
        rows.append({"seq_len": seq, "per_rank_bytes": everyone, "max_bytes": max(everyone)})
    if dist.get_rank() == 0:
        out.write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cp: int, lengths: list[int]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            f"--nproc_per_node={cp}",
            f"--master_port={_free_port()}",
            __file__,
            "--worker",
            str(out),
            "--lengths",
            *map(str, lengths),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--budget-mib", type=float, default=64.0, help="per-rank activation budget (MiB)")
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "context_parallel.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.lengths)
        return
    budget = args.budget_mib * 2**20
    results = []
    for cp in args.cp:
        # a length only where it splits into 2*cp equal chunks
        rows = run(cp, [s for s in args.lengths if s % (2 * cp) == 0])
        fitting = [r["seq_len"] for r in rows if r["max_bytes"] <= budget]
        results.append(
            {
                "cp": cp,
                "rows": rows,
                "longest_fitting_seq_len": max(fitting) if fitting else None,
                "bytes_per_token_per_rank": rows[-1]["max_bytes"] / rows[-1]["seq_len"],
            }
        )
        print(
            f"cp {cp}: "
            + ", ".join(f"{r['seq_len']}: {r['max_bytes'] / 2**20:.1f} MiB" for r in rows)
            + f" -> longest within {args.budget_mib:g} MiB: {results[-1]['longest_fitting_seq_len']}",
            flush=True,
        )
    result = {
        "what": "activation bytes kept for backward per rank (forward + causal LM loss, micro-batch 1, fp32)",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "model": MODEL,
        "budget_mib": args.budget_mib,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/context_parallel.py " + " ".join(sys.argv[1:]),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
