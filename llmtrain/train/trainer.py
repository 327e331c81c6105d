"""The training loop. Setup is a short list of build_* calls; the loop knows only an Objective."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from llmtrain.config import Config, ConfigError, Derived, derive, save_config, to_dict
from llmtrain.evaluation.training import check_eval_tasks, eval_task_metrics, shards_documents
from llmtrain.parallel.compile import attention_backend
from llmtrain.parallel.launch_env import check_launcher_settings
from llmtrain.parallel.runner import Runner
from llmtrain.parallel.universal import frozen_base
from llmtrain.train import checkpoint as ckpt
from llmtrain.train import flops
from llmtrain.train.metrics import MetricsSink, format_line, perplexity, plot_losses
from llmtrain.train.objectives import Objective, objective_for
from llmtrain.train.preemption import StopRequest, watch_launcher
from llmtrain.train.prefetch import Prefetcher
from llmtrain.train.runlock import lock_run_dir
from llmtrain.train.schedule import lr_multiplier
from llmtrain.utils import barrier, print0, rank

if TYPE_CHECKING:
    from llmtrain.data.contract import RunData
    from llmtrain.data.tokenizer import Tokenizer
    from llmtrain.models.spec import Transformer
    from llmtrain.parallel.engine import DistInfo


@dataclass(frozen=True)
class Throughput:
    """Turns a measured token rate into TFLOP/s per device, MFU and HFU (see llmtrain/train/flops.py)."""

    model_flops_per_token: float
    hw_flops_per_token: float
    peak: float | None  # dense BF16 FLOP/s of one device; None on CPU
    world_size: int

    def record(self, tokens_per_s: float) -> dict[str, float | None]:
        per_device = tokens_per_s / self.world_size
        rec = {
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": per_device * self.model_flops_per_token / 1e12,
            "mfu": flops.utilisation(per_device, self.model_flops_per_token, self.peak),
        }
        if self.hw_flops_per_token != self.model_flops_per_token:
            rec["hfu"] = flops.utilisation(per_device, self.hw_flops_per_token, self.peak)
        if torch.cuda.is_available():
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return rec


def build_throughput(cfg: Config, model: torch.nn.Module, device: torch.device, world_size: int) -> Throughput:
    m = cfg.model
    per_token, hw_per_token = flops.flops_per_token(
        model,
        m.n_layer,
        m.n_embd,
        cfg.train.seq_len,
        cfg.data,
        cfg.parallel.activation_checkpointing,
        cfg.parallel.checkpoint_every_n,
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return Throughput(per_token, hw_per_token, flops.peak_flops(name), world_size)


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss
    nonfinite_in_a_row: int = 0
    finite_in_a_row: int = 0  # since the resume point: confirms checkpoints good (checkpoint_paths.py)


def train(cfg: Config, objective: Objective | None = None) -> dict[str, Any]:
    """Run training as configured; every rank calls this. Returns a summary (rank 0 has all fields)."""
    if objective is None and cfg.train.objective != "family":
        raise ConfigError(
            f"train.objective={cfg.train.objective} needs its objective: run it with `llmtrain train` / "
            f"launchers/train.py (library: llmtrain.finetune.dpo.run_dpo(cfg))"
        )
    derived = derive(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # fail on a bad layout before any init
    check_launcher_settings(cfg, derived)
    from llmtrain.parallel.engine import init_distributed, preflight
    from llmtrain.parallel.parallelize import build_runner

    watch_launcher()  # a rank never outlives its launcher (nor waits for it in the c10d store)
    info = init_distributed(cfg.parallel.collective_timeout_s)
    derived = derive(cfg, info.world_size)
    lock = lock_run_dir(cfg.out_dir)  # one job per run directory, before anything in it is read or written
    resume_from = resolve_resume(cfg)
    changed = ckpt.resume_changes(cfg, resume_from) if resume_from is not None else []  # refuse before writing
    prepare_run_dir(cfg)
    log_preflight(cfg, preflight(info))
    torch.manual_seed(cfg.train.seed)
    data = build_data_for(cfg, derived)
    data.check_eval(cfg.train.eval_batches)  # an empty or too small validation split fails now, not after training
    check_eval_tasks(cfg.train, cfg.model)  # unknown train.eval_tasks too
    model = build_model_for(cfg, data.vocab_size)
    # A resume restores the weights, except a frozen base that the checkpoint only points at (LoRA)
    init_from = cfg.model.init_from if resume_from is None else frozen_base(resume_from)
    if init_from:
        from llmtrain.parallel.consolidate import init_model_from

        check_init_from_tokenizer(str(init_from), data.tokenizer)
        padded = init_model_from(model, init_from)
        print0(
            (
                f"model weights initialised from {init_from}; optimizer fresh, step 0"
                if resume_from is None
                else f"frozen base weights read from {init_from} (unchanged since the checkpoint)"
            )
            + (f"; vocabulary padded to {cfg.model.vocab_size} rows in {', '.join(padded)}" if padded else "")
        )
    if cfg.model.converters:  # after init_from, before any parallelism (llmtrain/models/converters.py)
        from llmtrain.models.converters import apply_converters

        print0(f"model converters applied: {', '.join(apply_converters(model, cfg.model))}")
    if cfg.quant.bits is not None:  # quantisation-aware training: the same hook, settings from quant.*
        from llmtrain.models.converters import converter

        converter("llmtrain.compress.quant.qat:fake_quant")(cfg.quant)(model)
        q = cfg.quant
        print0(
            f"quantisation-aware training: int{q.bits} fake-quantised linears (group size {q.group_size}, "
            f"{q.method}) from step {q.start_step + 1}"
        )
    if (attach := getattr(objective, "attach", None)) is not None:  # an objective's own trainable modules
        attach(model)  # (distillation's projections) join the model: the engine trains, checkpoints, resumes them
    throughput = build_throughput(cfg, model, info.device, info.world_size)
    runner = build_runner(model, cfg, derived, info.device, lr_multiplier(cfg.optim, cfg.train.max_steps))
    state = TrainerState()
    if resume_from is not None:
        saved = ckpt.load_checkpoint(runner, resume_from)
        state = TrainerState(
            step=saved["step"], tokens_seen=saved["tokens_seen"], skipped_steps=saved.get("skipped_steps", 0)
        )
        data.load_state_dict(saved.get("data", {}))
        print0(
            f"resumed from {resume_from} at step {state.step}"
            + (f"; applying changed keys: {', '.join(changed)}" if changed else "")
        )
    print_layout(cfg, derived, info, model)
    sink = MetricsSink(cfg.out_dir, cfg.log, to_dict(cfg), resume_step=state.step)
    objective = objective or objective_for(cfg.model)
    stop = StopRequest()
    try:
        with attention_backend(cfg.train.attention_backend, info.device):
            if run_loop(cfg, derived, runner, data, objective, state, sink, stop, throughput, model):
                summary = finish(cfg, runner, data, objective, state, sink)
            else:
                path = save(runner, cfg, state, data)
                print0(
                    f"stop requested by signal: checkpoint {path or '(none: state not finite)'} written at "
                    f"step {state.step}; rerun the same command to continue"
                )
                summary = {"step": state.step, "stopped": True}
                stop.mark_stopped()
    finally:
        stop.restore()
        sink.close()
        if lock is not None:
            lock.release()
    return summary


def resolve_resume(cfg: Config) -> Path | None:
    """Which checkpoint to continue from, per train.resume (auto | none | path)."""
    resume = cfg.train.resume
    if resume == "auto":
        return ckpt.latest_checkpoint(cfg.out_dir)
    if resume == "none":
        if ckpt.latest_checkpoint(cfg.out_dir) is not None:
            raise ConfigError(
                f"{cfg.out_dir} already holds checkpoints and train.resume=none would overwrite them; "
                f"use train.resume=auto to continue that run, or choose a new out_dir"
            )
        return None
    try:
        return ckpt.resolve_checkpoint(resume)
    except ValueError as exc:
        raise ConfigError(f"train.resume: {exc}") from None


def prepare_run_dir(cfg: Config) -> None:
    if rank() == 0:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial(cfg.out_dir)
        save_config(cfg, Path(cfg.out_dir) / "config.yaml")
    barrier()


def log_preflight(cfg: Config, report: dict[str, Any]) -> None:
    hosts = ", ".join(f"{h}{ranks}" for h, ranks in report["hosts"].items())
    print0(
        f"preflight: {report['world_size']} ranks joined over {report['backend']} ({hosts}); all-reduce "
        f"{report['allreduce_ms']:.2f} ms; torch {report['torch']}, deepspeed {report['deepspeed']}"
        + (f", {report['gpu']}" if report["gpu"] else "")
    )
    if rank() == 0:
        (Path(cfg.out_dir) / "preflight.json").write_text(json.dumps(report, indent=1))


def build_data_for(cfg: Config, derived: Derived):
    from llmtrain.data import build_data

    dp_rank = derived.dims.coords(rank()).dp
    data = build_data(
        cfg.data,
        seq_len=cfg.train.seq_len,
        seed=cfg.train.seed,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=derived.grad_accum,
        dp_rank=dp_rank,
        dp_size=derived.dp_size,
    )
    data.check_model_vocab(cfg.model.vocab_size)  # names the dataset's manifest and the fix
    return data


def build_model_for(cfg: Config, vocab_size: int) -> torch.nn.Module:
    from llmtrain.models import build_model

    if vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size >= {vocab_size} (a multiple of 64 is fastest on GPU)"
        )
    model = build_model(cfg.model)
    torch.manual_seed(cfg.train.seed)  # the same weights on every rank and every layout
    cast("Transformer", model).init_weights()
    return model


def print_layout(cfg: Config, derived: Derived, info: DistInfo, model: torch.nn.Module) -> None:
    from llmtrain.parallel.ds_compat import full_numel

    n = sum(full_numel(p) for p in model.parameters())  # ZeRO-3 leaves numel() 0
    n += sum(p.numel() * (p.llmtrain_ep_shard[1] - 1) for p in model.parameters() if hasattr(p, "llmtrain_ep_shard"))
    print0(
        f"llmtrain | model {cfg.model.name} {n / 1e6:.2f}M params | world {derived.world_size} "
        f"(dp {derived.dp_size} x tp {cfg.parallel.tp} x pp {cfg.parallel.pp}{_cp_part(cfg)}{_moe_part(cfg)}) on {info.device.type}/"
        f"{info.backend} | "
        f"ZeRO-{cfg.parallel.zero_stage} {cfg.precision} | micro {cfg.train.micro_batch_size} x accum "
        f"{derived.grad_accum} x dp {derived.dp_size} = {cfg.train.global_batch_size} seqs x {cfg.train.seq_len} tokens"
        f" | activation checkpointing {cfg.parallel.activation_checkpointing}"
    )
    if cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp * cfg.parallel.ep > 1:
        print0(f"layout: {derived.dims.describe()}")


def _moe_part(cfg: Config) -> str:
    moe = getattr(cfg.model, "moe", None)
    if moe is None:
        return ""
    return f" | MoE {moe.num_experts} experts, top {moe.top_k}, ep {cfg.parallel.ep}"


def _cp_part(cfg: Config) -> str:
    p = cfg.parallel
    return f" x cp {p.cp} ({p.cp_method}, {cfg.train.seq_len // p.cp} tokens per rank)" if p.cp > 1 else ""


def run_loop(
    cfg: Config,
    derived: Derived,
    runner: Runner,
    data: RunData,
    objective: Objective,
    state: TrainerState,
    sink: MetricsSink,
    stop: StopRequest,
    throughput: Throughput,
    model: torch.nn.Module | None = None,
) -> bool:
    """Train up to train.max_steps; returns False when a stop signal ended the loop early. `model` (the plain
    model the runner wraps) hears each step's index through the converters' step hooks (converters.py)."""
    from llmtrain.models.converters import at_step

    t = cfg.train
    if model is not None:
        at_step(model, max(state.step - 1, 0))  # a resumed run: as the last step before the checkpoint ran
    window = LogWindow(cfg, derived, throughput, sink, runner, objective)
    progress = _progress_bar(cfg, state.step)
    loader = Prefetcher(data, pin_memory=runner.device.type == "cuda", enabled=t.prefetch)
    try:
        while state.step < t.max_steps:
            if model is not None:
                at_step(model, state.step)
            log_now = (state.step + 1) % cfg.log.interval == 0 or state.step + 1 == t.max_steps
            result = runner.train_step(objective, loader.batches(state.step), log_now, stop.requested)
            check_finite(cfg, state, result.skipped)
            state.step += 1
            state.tokens_seen += derived.tokens_per_step
            ckpt.confirm_good(cfg.out_dir, state.step, state.finite_in_a_row, cfg.train.max_nonfinite_steps)
            window.add(result.loss)
            progress.update(1)
            if log_now:
                progress.set_postfix(loss=f"{window.flush(state, result.grad_norm):.3f}")
            if _due(t.eval_interval, state.step, t.max_steps):
                log_eval(cfg, runner, data, objective, state, sink)
            if _due(cfg.checkpoint.interval, state.step, t.max_steps) and state.nonfinite_in_a_row == 0:
                save(runner, cfg, state, data)  # never rotate good checkpoints out during a divergence
            # the step's own all-reduce carried the ranks' agreement where it could (one sync point less)
            stopping = result.stop if result.stop is not None else stop.agreed(runner.device)
            if state.step < t.max_steps and stopping:
                return False
        return True
    finally:
        progress.close()
        loader.close()


def _due(interval: int, step: int, max_steps: int) -> bool:
    """Periodic work at every `interval` steps; the last step has its own (final eval and checkpoint)."""
    return bool(interval) and step % interval == 0 and step < max_steps


class LogWindow:
    """Accumulates losses between log lines without syncing the device; one sync per log line."""

    def __init__(
        self,
        cfg: Config,
        derived: Derived,
        throughput: Throughput,
        sink: MetricsSink,
        runner: Runner,
        objective: Objective,
    ):
        self.cfg, self.derived, self.throughput, self.sink, self.device = cfg, derived, throughput, sink, runner.device
        self.runner, self.objective = runner, objective
        self.lr_at = lr_multiplier(cfg.optim, cfg.train.max_steps)
        self._reset()

    def _reset(self) -> None:
        self.start, self.steps, self.loss_sum = time.perf_counter(), 0, torch.zeros((), device=self.device)

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def flush(self, state: TrainerState, grad_norm: float | None) -> float:
        loss = _mean_over_ranks(self.loss_sum / self.steps)
        rate = self.derived.tokens_per_step * self.steps / (time.perf_counter() - self.start)
        rec = train_record(
            state, loss, self.cfg.optim.lr * self.lr_at(state.step - 1), grad_norm, self.throughput.record(rate)
        )
        rec.update({k: _mean_over_ranks(v) for k, v in self.runner.pop_metrics(self.objective, True).items()})
        self.sink.log(rec, console=format_line(rec, self.cfg.train.max_steps))
        self._reset()
        return loss


def check_finite(cfg: Config, state: TrainerState, skipped: bool) -> None:
    """Count skipped (non-finite) steps; stop the run after train.max_nonfinite_steps in a row."""
    state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if skipped else 0
    state.finite_in_a_row = 0 if skipped else state.finite_in_a_row + 1
    state.skipped_steps += int(skipped)
    if skipped:
        print0(
            f"step {state.step + 1}: loss is not finite on some rank; update skipped "
            f"({state.nonfinite_in_a_row} in a row, {state.skipped_steps} in total)"
        )
    if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
        good = ckpt.fall_back_to_good(cfg.out_dir)  # `latest` now names it (or is removed)
        where = (
            f"The last good checkpoint is {good}; {ckpt.LATEST} names it again, so rerunning resumes from it"
            if good
            else "The last good checkpoint: none yet (a checkpoint is good once the "
            "train.max_nonfinite_steps steps after it stayed finite), so rerunning starts afresh"
        )
        raise NonFiniteLossError(
            f"the loss was not finite for {state.nonfinite_in_a_row} steps in a row (up to step "
            f"{state.step + 1}); stopping. {where}. Lower optim.lr, raise optim.warmup_steps or check the "
            f"data, then rerun."
        )


class NonFiniteLossError(RuntimeError):
    """The run diverged: too many consecutive steps with a non-finite loss."""


def train_record(
    state: TrainerState, loss: float, lr: float, grad_norm: float | None, rates: dict[str, float | None]
) -> dict[str, Any]:
    return {
        "step": state.step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_seen": state.tokens_seen,
        "skipped_steps": state.skipped_steps,
        **rates,
    }


def held_out_batches(cfg: Config, data: RunData) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """This rank's share of the first train.eval_batches global micro-batches of the validation split
    (micro_batch_size sequences each): the same sequences whatever the world size. Rank r's b-th batch is
    global batch b * dp + r; every rank runs the same number of forwards (ZeRO-3 and pipeline stages
    need that), the ones past the end flagged False and not counted."""
    dp_size, dp_rank = getattr(data, "dp_size", 1), getattr(data, "dp_rank", 0)
    mine = data.val_batches(-(-cfg.train.eval_batches // dp_size))
    n = min(cfg.train.eval_batches, len(mine) * dp_size)  # a split shorter than asked: all of it
    return [(mb, b * dp_size + dp_rank < n) for b, mb in enumerate(mine)]


def evaluate(runner: Runner, objective: Objective, batches: list[tuple[dict[str, torch.Tensor], bool]]) -> float:
    """Mean held-out loss over the counted batches of every rank (each global batch counted once)."""
    total = torch.zeros(2, device=runner.device)
    for mb, counted in batches:
        loss = runner.eval_loss(objective, mb)  # every rank runs every forward, counted or not
        if counted:
            total[0] += loss
            total[1] += 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)  # tp/pp copies scale both sums alike
    v = (total[0] / total[1].clamp(min=1)).item()
    return v if math.isfinite(v) else float("nan")


def check_init_from_tokenizer(init_from: str, tokenizer: Tokenizer) -> None:
    """model.init_from a checkpoint trained with another tokenizer: its embedding rows mean other tokens."""
    from llmtrain.data import check_same_tokenizer
    from llmtrain.inference import checkpoint_tokenizer

    try:
        other = checkpoint_tokenizer(init_from)
    except (ValueError, OSError):
        return  # no recorded tokenizer (as eval): the vocabulary size check still applies
    check_same_tokenizer(tokenizer, other, f"model.init_from={init_from}")


def eval_record(objective: Objective, step: int, loss: float, extra: dict[str, float]) -> tuple[dict[str, Any], str]:
    """An eval's metrics.jsonl record and console line: a perplexity only when the objective's loss is a mean
    token cross-entropy (its `perplexity` member, default True; DPO's is not)."""
    record: dict[str, Any] = {"step": step, "eval_loss": loss}
    line = f"eval @ step {step}: loss {loss:.4f}"
    if getattr(objective, "perplexity", True):
        record["eval_ppl"] = perplexity(loss)
        line += f" | perplexity {perplexity(loss):.2f}"
    record.update(extra)
    return record, line + "".join(f" | {k[5:]} {v:.4f}" for k, v in extra.items())


def done_line(objective: Objective, record: dict[str, Any]) -> str:
    """The final line's figures: held-out loss, then the perplexity or the objective's `headline_metrics`."""
    parts = [f"done: step {record['step']}", f"held-out loss {record['eval_loss']:.4f}"]
    if "eval_ppl" in record:
        parts.append(f"perplexity {record['eval_ppl']:.2f}")
    for name in getattr(objective, "headline_metrics", ()):
        if f"eval_{name}" in record:
            parts.append(f"{name} {record[f'eval_{name}']:.4f}")
    return " | ".join(parts)


def log_eval(
    cfg: Config, runner: Runner, data: RunData, objective: Objective, state: TrainerState, sink: MetricsSink
) -> dict[str, Any]:
    """Evaluate on the held-out batches (and train.eval_tasks), log it; returns the eval record."""
    loss = evaluate(runner, objective, held_out_batches(cfg, data))
    extra = {f"eval_{k}": _mean_over_ranks(v) for k, v in runner.pop_metrics(objective, False).items()}
    shard = shards_documents(cfg.parallel)  # train.eval_tasks: documents over the data-parallel ranks when it can
    extra.update(eval_task_metrics(cfg.train, cfg.model.block_size, runner, data.tokenizer, shard))
    record, line = eval_record(objective, state.step, loss, extra)
    sink.log(record, console=line)
    return record


def save(runner: Runner, cfg: Config, state: TrainerState, data: RunData) -> Path | None:
    trainer_state = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "skipped_steps": state.skipped_steps,
        "data": data.state_dict(),
    }
    path = ckpt.save_checkpoint(runner, cfg, state.step, trainer_state)  # None: not finite, not written
    if path is not None:
        print0(f"checkpoint saved: {path}")
    return path


def finish(
    cfg: Config, runner: Runner, data: RunData, objective: Objective, state: TrainerState, sink: MetricsSink
) -> dict[str, Any]:
    """Final checkpoint (first: a failing eval must not cost the run), final eval, loss plot, a sample."""
    path = save(runner, cfg, state, data)
    if path is not None and state.nonfinite_in_a_row == 0:  # the run completed finitely
        ckpt.mark_good(path)
    record = log_eval(cfg, runner, data, objective, state, sink)
    summary: dict[str, Any] = {k: v for k, v in record.items() if k in ("step", "eval_loss", "eval_ppl")}
    summary.update(
        {k: record[k] for k in (f"eval_{n}" for n in getattr(objective, "headline_metrics", ())) if k in record}
    )
    if rank() == 0:
        png = plot_losses(sink.path, Path(cfg.out_dir) / "loss.png")
        summary["plot"] = str(png) if png else None
    if cfg.train.sample_tokens > 0 and getattr(objective, "generative", False):  # not for encoders
        summary["sample"] = sample_text(cfg, runner, data)
        print0(f"sample: {summary['sample']!r}")
    print0(
        f"{done_line(objective, record)} | metrics {sink.path}"
        + (f" | plot {summary.get('plot')}" if summary.get("plot") else "")
    )
    return summary


@torch.no_grad()
def sample_text(cfg: Config, runner: Runner, data: RunData) -> str:
    """All ranks generate the same tokens in lockstep (ZeRO-3 gathers parameters in every forward)."""
    from llmtrain.models.generation import generate

    tok = data.tokenizer
    prompt = torch.tensor([tok.encode(cfg.train.sample_prompt)], dtype=torch.long, device=runner.device)
    gen = torch.Generator(device=runner.device).manual_seed(cfg.train.seed)
    out = generate(
        runner.logits,
        prompt,
        cfg.train.sample_tokens,
        block_size=cfg.model.block_size,
        temperature=0.8,
        top_k=40,
        generator=gen,
    )
    return tok.decode(out[0].tolist())


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    v = value.item()
    return v if math.isfinite(v) else float("nan")


def _progress_bar(cfg: Config, start: int) -> Any:
    from tqdm import tqdm

    # Only on rank 0 and only on a terminal: piped logs get the per-interval console lines instead.
    disable = None if (cfg.log.progress and rank() == 0) else True
    return tqdm(total=cfg.train.max_steps, initial=start, disable=disable, dynamic_ncols=True, unit="step")
