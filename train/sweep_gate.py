"""Choose the content gate (`min_content_kept`) from one ungated `rpo eval` run on tuning users.

Run `rpo eval` once with the gate off (`RPO_MIN_CONTENT_KEPT=0`) and `--checkpoint FILE` on the
tuning users (946-1045, never the evaluation users 0-99), then:

    .venv/bin/python train/sweep_gate.py FILE [--method rpo+adapter]

For each threshold, an answer keeping less of the generic text's content words falls back to
the generic text (as the runtime does); the table gives the mean ROUGE-1 and its paired
difference to copy with the 95% bootstrap interval over users. Exact where each text is one
piece (`piece_words` large enough), an approximation where pieces were gated one by one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rpo_local.evaluate import paired_bootstrap, rouge
from rpo_local.text import content_kept

THRESHOLDS = [round(0.1 * i, 1) for i in range(11)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="an `rpo eval --checkpoint` file of an ungated run")
    ap.add_argument("--method", default="rpo+adapter")
    args = ap.parse_args()
    lines = args.checkpoint.read_text(encoding="utf-8").splitlines()
    users = [json.loads(line) for line in lines[1:] if line.strip()]
    copy = [u["outputs"]["copy"]["output"] for u in users]
    answers = [u["outputs"][args.method]["output"] for u in users]
    golds = [u["gold"] for u in users]
    base = [rouge(c, g)[0] for c, g in zip(copy, golds, strict=True)]
    kept = [content_kept(a, c) for a, c in zip(answers, copy, strict=True)]
    rows = []
    for t in THRESHOLDS:
        scores = [rouge(a if k >= t else c, g)[0] for a, c, g, k in zip(answers, copy, golds, kept, strict=True)]
        diff, low, high = paired_bootstrap(scores, base)
        rows.append({"threshold": t, "rouge1": round(sum(scores) / len(scores), 4), "vs_copy": round(diff, 4),
                     "ci95": [round(low, 4), round(high, 4)],
                     "rewritten": round(sum(k >= t and a != c for a, c, k in zip(answers, copy, kept, strict=True))
                                        / len(users), 3)})
    print(json.dumps({"users": len(users), "copy_rouge1": round(sum(base) / len(base), 4), "thresholds": rows}, indent=1))


if __name__ == "__main__":
    main()
