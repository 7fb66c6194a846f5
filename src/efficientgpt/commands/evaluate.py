"""``efficientgpt eval``: perplexity of a model on any data spec, or the task metric on ``task:`` specs."""

from __future__ import annotations

import argparse

from efficientgpt.cli_common import Output, add_data_arg, add_device_arg, add_json_arg, add_model_arg

EPILOG = """\
examples:
  efficientgpt eval --model embedded:tiny --data embedded:prose --json
  efficientgpt eval --model embedded --data embedded:code --split test
  efficientgpt eval --model gpt2 --data hf:wikitext/wikitext-2-raw-v1 --split test --seq-len 1024
  efficientgpt eval --model ./my-model --data notes.txt
  efficientgpt eval --model embedded:tiny --delta D --data embedded:code --json
  efficientgpt eval --model embedded:tiny --delta D --data task:code_or_prose --json

Perplexity follows the SparseGPT/Wanda protocol: the split is joined, tokenized, cut into
non-overlapping windows of --seq-len tokens (default: the model's context), and exp(mean NLL) over
all predicted tokens is reported. A task spec (task:NAME, see 'efficientgpt tasks') reports the task
metric instead: "accuracy" holds rank-classification accuracy for choice tasks and exact match for
generation tasks ("metric" says which), "loss" the mean NLL per gold-answer token, on at most
--max-examples examples per task.
"""


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a data split",
                       description="Evaluate a causal LM's perplexity on a data split.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, default=None)
    p.add_argument("--delta", default=None, metavar="DIR",
                   help="a saved delta ('tune --out' directory) or a Hugging Face PEFT adapter directory to "
                        "attach first; --model then defaults to the delta's base model")
    add_data_arg(p)
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"),
                   help="which split (default: validation)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows (task specs: sequences) per forward pass (default: 8; task specs: 32)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the split")
    p.add_argument("--max-examples", type=int, default=None,
                   help="task specs: score at most N examples per task (default: the spec's eval=N, else 200)")
    add_device_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from efficientgpt.data import sources, tokens
    from efficientgpt.errors import UserError
    from efficientgpt.eval.perplexity import default_seq_len, perplexity
    from efficientgpt.models.loading import load_model
    from efficientgpt.train.distributed import pick_device

    out = Output(args)
    for name in ("seq_len", "batch_size", "max_tokens"):
        v = getattr(args, name)
        if v is not None and v < (2 if name == "seq_len" else 1):
            raise UserError(f"--{name.replace('_', '-')} {v} is out of range: must be >= {2 if name == 'seq_len' else 1}")
    from efficientgpt.commands.delta_tools import attach_delta, base_model_spec

    spec = args.model or (base_model_spec(args.delta) if args.delta else None) or "embedded"
    loaded = load_model(spec, trust_remote_code=args.trust_remote_code, device=pick_device(args.device))
    delta = attach_delta(loaded.model, args.delta) if args.delta else None
    if args.data.startswith("task:"):
        return _run_task(args, out, spec, loaded, delta)
    data = sources.load_text(args.data, args.split)
    ids = tokens.encode(loaded.tokenizer, data)
    seq_len = args.seq_len or default_seq_len(loaded.model)
    res = perplexity(loaded.model, ids, seq_len, batch_size=args.batch_size or 8, max_tokens=args.max_tokens,
                     progress=not out.json)
    result = {**res.to_dict(), "model": loaded.describe(), "data": data.describe(),
              "delta": delta.describe() if delta is not None else None}
    label = spec + (f" + {delta.method} delta {args.delta}" if delta is not None else "")
    out.result(result, human=(f"{label} on {args.data} ({args.split}): perplexity {res.perplexity:.3f} "
                              f"(loss {res.loss:.4f}, {res.tokens:,} tokens, {res.windows} windows of {seq_len})"))
    return 0


def _run_task(args: argparse.Namespace, out, spec: str, loaded, delta) -> int:
    from efficientgpt.errors import UserError
    from efficientgpt.pipeline import open_data

    if args.max_examples is not None and args.max_examples < 1:
        raise UserError(f"--max-examples {args.max_examples} is out of range: must be >= 1")
    source = open_data(args.data, loaded.tokenizer)
    if delta is not None and hasattr(delta, "bind_data"):
        delta.bind_data(source)  # multi-task deltas score each task with its own target prompt
    res = source.evaluate_split(loaded.model, args.split, max_examples=args.max_examples or source.eval_examples,
                                seq_len=args.seq_len, batch_size=args.batch_size or 32)
    result = {**res, "model": loaded.describe(), "data": source.describe(),
              "delta": delta.describe() if delta is not None else None}
    label = spec + (f" + {delta.method} delta {args.delta}" if delta is not None else "")
    out.result(result, human=(f"{label} on {args.data} ({args.split}): {res['metric']} {res['accuracy']:.4f} "
                              f"(loss {res['loss']:.4f}, {res['examples']} examples)"))
    return 0
