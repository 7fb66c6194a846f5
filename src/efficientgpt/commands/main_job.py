"""``efficientgpt run`` (also ``efficientgpt`` with no arguments): the main job on the embedded default.

Pretrains the embedded default model (cached after the first run) and reports its validation
perplexity on the prose and code domains.
"""

from __future__ import annotations

import argparse

from efficientgpt.cli_common import Output, add_json_arg


def register(sub) -> None:
    p = sub.add_parser("run", help="the main job: pretrain the embedded default and report its perplexity",
                       description="The main job on the embedded default (what 'efficientgpt' with no "
                                   "arguments runs): pretrain the embedded model if it is not cached, then "
                                   "report its validation perplexity on embedded prose and code.",
                       epilog="examples:\n  efficientgpt\n  efficientgpt run --model embedded:tiny --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", metavar="SPEC",
                   help="embedded preset to use: embedded (default) or embedded:tiny")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from efficientgpt.data import sources, tokens
    from efficientgpt.eval.perplexity import default_seq_len, perplexity
    from efficientgpt.models.loading import load_model

    out = Output(args)
    out.info(f"main job: {args.model} (pretrained on first use, then cached)")
    loaded = load_model(args.model)
    seq_len = default_seq_len(loaded.model)
    rows = {}
    for domain in ("prose", "code"):
        data = sources.load_text(f"embedded:{domain}", "validation")
        res = perplexity(loaded.model, tokens.encode(loaded.tokenizer, data), seq_len, batch_size=16,
                         progress=not out.json)
        rows[domain] = {**res.to_dict(), "data_sha256": data.fingerprint}
    table = ["| data | perplexity | loss | tokens |", "|---|---:|---:|---:|"]
    table += [f"| embedded:{d} (validation) | {r['perplexity']:.2f} | {r['loss']:.4f} | {r['tokens']:,} |"
              for d, r in rows.items()]
    out.result({"model": loaded.describe(), "perplexity": rows},
               human=f"model: {loaded.path}\n" + "\n".join(table))
    return 0
