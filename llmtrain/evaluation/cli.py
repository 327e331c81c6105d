"""`llmtrain generate` and `llmtrain eval`: the command line of llmtrain/inference.py (text and perplexity)
and llmtrain/evaluation/run.py (lm-evaluation-harness tasks). It parses and calls.

CHECKPOINT is a run directory (its latest checkpoint), a `checkpoints/` folder, one `step_*` folder, a
consolidated folder or an `llmtrain import-hf` folder. The weights are read one parameter at a time
from the layout-independent copy every checkpoint holds (`load_model_weights`), whatever ZeRO stage,
tensor or pipeline layout wrote it, so only one copy of the model is ever in memory.
"""

from __future__ import annotations

import argparse
import math


def cmd_generate(args: argparse.Namespace) -> int:
    if args.chat:
        return cmd_chat(args)
    if args.prompt is None:
        from llmtrain.errors import UserError

        raise UserError("generate needs --prompt TEXT (or --chat, which reads turns from the terminal)")
    from llmtrain.inference import generate_text

    print(
        generate_text(
            args.checkpoint,
            args.prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            tokenizer=args.tokenizer,
            device=args.device,
            use_cache=not args.no_cache,
        )
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """`generate --chat`: one reply to --prompt, or a conversation read from stdin (an empty line or EOF ends it)."""
    import sys

    from llmtrain.inference import ChatSession

    chat = ChatSession(
        args.checkpoint,
        system=args.system,
        template=args.chat_template,
        tokenizer=args.tokenizer,
        device=args.device,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
    )
    if args.prompt is not None:
        print(chat.say(args.prompt))
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        reply = chat.say(line.strip())
        print(f"model> {reply}" if interactive else reply, flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.tasks:
        return cmd_eval_tasks(args)
    from llmtrain.inference import eval_perplexity

    loss, n = eval_perplexity(args.checkpoint, args.data, args.seq_len, args.batch_size, args.batches, args.device)
    print(f"eval {args.checkpoint} on {args.data}: {n:,} tokens | loss {loss:.4f} | perplexity {math.exp(loss):.2f}")
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    """`llmtrain eval MODEL --tasks TASKS`: a results table on stdout and the full results as JSON. Under
    torchrun (WORLD_SIZE > 1) each rank loads the model and scores its share of the documents. BERT models
    take bert_mlm / bert_classify (llmtrain/evaluation/bert.py), reported in the same format."""
    from llmtrain.evaluation.bert import is_bert_spec
    from llmtrain.evaluation.run import run_tasks, write_results

    if is_bert_spec(args.tasks):
        from llmtrain.evaluation.bert import results_table, run_bert_tasks

        res = run_bert_tasks(
            args.checkpoint, args.tasks, args.device, args.batch_size, args.limit, args.batches, args.seq_len
        )
        print(results_table(res))
        print(f"results: {write_results(res, args.output)}")
        return 0

    results = run_tasks(
        args.checkpoint,
        args.tasks,
        device=args.device,
        batch_size=args.batch_size,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        bootstrap_iters=args.bootstrap_iters,
    )
    if results is None:  # not rank 0: it sent its metrics there
        return 0
    from lm_eval.utils import make_table

    print(make_table(results))
    print(f"results: {write_results(results, args.output)}")
    return 0


def _doc_paragraph(i: int) -> str:
    """Paragraph i of this module's docstring as one line (a --help description, whole sentences)."""
    return " ".join(__doc__.split("\n\n")[i].split())


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint (greedy, temperature, top-k, top-p; KV cache)",
        description="Continue a prompt with a trained or imported decoder. " + _doc_paragraph(1),
    )
    p.add_argument("checkpoint", help="run, checkpoint, consolidated or import-hf directory")
    p.add_argument("--prompt", default=None, help="text to continue (with --chat: one user turn)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="talk through the model's chat template: reply to --prompt, or read turns from stdin until an "
        "empty line; the reply ends at the template's end of turn",
    )
    p.add_argument("--system", default="", help="--chat: a system message opening the conversation")
    p.add_argument(
        "--chat-template", default="", help="--chat: chatml or a jinja file (default: the checkpoint tokenizer's)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="", help="tokenizer directory or tokenizer.json (default: the checkpoint's)")
    p.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window each step (no KV cache)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "eval",
        help="perplexity of a checkpoint on the validation split of prepared data",
        description="Perplexity of a decoder checkpoint on prepared data. " + _doc_paragraph(1),
    )
    p.add_argument("checkpoint", help="run, checkpoint, consolidated or import-hf directory")
    p.add_argument("--data", default="bundled", help="prepared dataset directory (llmtrain prepare-data) or 'bundled'")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: the model's block_size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=50, help="at most this many validation batches")
    p.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--tasks",
        default="",
        help="lm-evaluation-harness tasks instead of perplexity: comma-separated "
        "task names (llmtrain_cloze, llmtrain_next_verse offline) or paths to task YAMLs "
        "(needs `pip install -e .[eval]`); for a BERT model bert_mlm (masked-LM accuracy) and/or "
        "bert_classify (a fine-tuned classifier's accuracy)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="--tasks: at most this many documents (BERT: sequences) per task"
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples per prompt")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="--tasks: bootstrap samples for stderrs")
    p.add_argument("--output", default="eval_results.json", help="--tasks: where the results JSON goes")
    p.set_defaults(fn=cmd_eval)
