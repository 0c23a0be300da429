"""How to cut a reply into pieces, measured on the replies task (`rpo eval --replies`).

Variants of the piece-by-piece rewrite, each run on the same users (by default the tuning users
946-1045 of LaMP-7, never the evaluation users 0-99) with the shipped adapter; prints one JSON
document: per variant ROUGE-1/ROUGE-L, the paired difference to copy with its 95% bootstrap
interval, the share of pieces rewritten, latency per reply and per piece.

- `default`: the configured settings (shipped: one sentence per piece, the items retrieved once
  for the whole reply, so llama.cpp reuses the prompt prefix the pieces share);
- `paragraph`: short neighbouring sentences of a paragraph together, up to 30 words a piece;
- `piece-retrieval`: the items retrieved for each piece by its own words (`retrieval_scope = piece`);
- `neighbours`: the previous and the next piece shown to the model as context.

Run: python bench/bench_pieces.py [--offset 946] [-n 24] [--variants default,sentence,...]
(the paraphrases for the task are cached; see rpo_local/replies.py)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAMP7 = Path(os.environ.get("RPO_LAMP7", ROOT.parent / "shared" / "data" / "lamp7" / "dev.jsonl"))
VARIANTS = ("default", "paragraph", "piece-retrieval", "neighbours")


@contextmanager
def variant(name: str):
    """The product code with one setting changed (restored afterwards)."""
    from rpo_local import prompts, reflect, segment

    saved = (segment.split, prompts.reflection_user_message, reflect.Reflector.rewrite)
    scope = os.environ.get("RPO_RETRIEVAL_SCOPE")
    try:
        if name == "paragraph":
            segment.split = functools.partial(saved[0], piece_words=30)
        elif name == "piece-retrieval":  # a config key: run_eval loads the config, environment included
            os.environ["RPO_RETRIEVAL_SCOPE"] = "piece"
        elif name == "neighbours":
            def rewrite(self, generic, profile=None, **kw):
                pieces = [s.plain for s in saved[0](generic) if s.prose]

                def message(piece, items):
                    i = pieces.index(piece) if piece in pieces else -1
                    around = [pieces[j] for j in (i - 1, i + 1) if i >= 0 and 0 <= j < len(pieces)]
                    base = saved[1](piece, items)
                    if not around:
                        return base
                    head, tail = base.split("\n\nGeneric reply:\n", 1)
                    return f"{head}\n\nAround it in the reply:\n{' … '.join(around)}\n\nGeneric reply:\n{tail}"

                prompts.reflection_user_message = message
                try:
                    return saved[2](self, generic, profile, **kw)
                finally:
                    prompts.reflection_user_message = saved[1]
            reflect.Reflector.rewrite = rewrite
        elif name != "default":
            raise SystemExit(f"unknown variant {name!r}; use any of {', '.join(VARIANTS)}")
        yield
    finally:
        segment.split, prompts.reflection_user_message, reflect.Reflector.rewrite = saved
        if scope is None:
            os.environ.pop("RPO_RETRIEVAL_SCOPE", None)
        else:
            os.environ["RPO_RETRIEVAL_SCOPE"] = scope


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=LAMP7)
    ap.add_argument("--offset", type=int, default=946)
    ap.add_argument("-n", "--limit", type=int, default=24)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()

    from rpo_local import evaluate, lamp, replies
    from rpo_local.adapters import builtin_adapter_path
    from rpo_local.engine import open_engine

    engine = open_engine()
    data = replies.build(lamp.load(args.data), engine, offset=args.offset, limit=args.limit)
    out = {"users": len(data.users), "offset": args.offset, "limit": args.limit, "variants": {}}
    for name in args.variants.split(","):
        with variant(name):
            report = evaluate.run_eval(data, engine, methods=["copy", "rpo+adapter"], adapter=builtin_adapter_path())
        summary = report.summary("rpo+adapter")
        out["variants"][name] = {**asdict(summary), "retrieval_scope": report.retrieval_scope,
                                 "wall_s": round(report.wall_s, 1)}
        print(f"{name}: {json.dumps(out['variants'][name])}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
