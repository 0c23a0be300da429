"""Choose the content gate (`min_content_kept`) for an adapter on held-out history items.

The gate refuses a rewrite that keeps too little of the generic text's content words (the
reply falls back to the generic text). Where to put it depends on the adapter, and choosing it
on the evaluation users would flatter `rpo eval`. So: for training users with more history
items than the adapter's back-translation used (--skip-items), the first unused item y is
paraphrased by the neutralizer (llama.cpp, greedy), rewritten by the adapter with no gate,
and scored; the printed table gives, per threshold, the mean ROUGE-1 change over leaving the
generic text unchanged.

    .venv/bin/python train/calibrate_gate.py --adapter A.gguf --neutralizer N.gguf --users 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tqdm import tqdm

from rpo_local.config import load_config
from rpo_local.engine import open_engine
from rpo_local.reflect import Reflector
from rpo_local.retrieve import retrieve
from rpo_local.store import Store, digest
from rpo_local.text import content_kept
from rpo_local.training import dataset
from rpo_local.training.rl import rouge1_reward

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = [round(0.1 * i, 1) for i in range(10)]


def held_out(rows: list[dict], skip_items: int, users: int) -> list[tuple[dict, str]]:
    """(row, first history item the back-translation did not use), for up to `users` rows."""
    out = []
    for row in rows:
        items = [p["text"].strip() for p in row["profile"] if p.get("text", "").strip()]
        if len(items) > skip_items:
            out.append((row, items[skip_items]))
        if len(out) >= users:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lamp", type=Path, default=ROOT.parent / "shared" / "data" / "lamp7" / "dev.jsonl")
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--neutralizer", type=Path, required=True)
    ap.add_argument("--skip-items", type=int, default=40, help="history items per user the training used")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "train" / "runs" / "gate.jsonl")
    args = ap.parse_args()

    config = load_config()
    cases = held_out(dataset.read_lamp(args.lamp, skip=dataset.EVAL_USERS), args.skip_items, args.users)
    engine = open_engine(config, adapter=args.neutralizer)
    # the budget the gate was calibrated with (the length rule came later)
    generics = [dataset.paraphrase(engine, y, max_tokens=96) for _, y in tqdm(cases, desc="paraphrase", file=sys.stderr)]
    engine.set_adapter(args.adapter)
    reflector = Reflector(None, engine, dataclasses.replace(config, min_content_kept=0.0))
    records = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with Store.open(args.out.with_suffix(".db")) as store:
        for (row, y), g in tqdm(list(zip(cases, generics, strict=True)), desc="rewrite", file=sys.stderr):
            if g.strip().lower() == y.lower() or not dataset.is_rewrite(g, y):
                continue  # the same filter as the training data
            name = f"lamp-{row['id']}"
            store.add_items(name, [{"text": p["text"], "kind": "tweet"} for p in row["profile"]
                                   if p.get("text", "").strip() and digest(p["text"].strip()) != digest(y)])
            context = [h["text"] for h in retrieve(store, name, g, config.k)]
            chunk = reflector.rewrite_with_items(g, context)
            records.append({"user": row["id"], "generic": g, "target": y, "output": chunk.output,
                            "fallback": chunk.fallback, "kept": round(content_kept(chunk.output, g), 3),
                            "delta": round(rouge1_reward(chunk.output, y) - rouge1_reward(g, y), 4)})
    args.out.with_suffix(".db").unlink(missing_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    table = {th: round(sum(r["delta"] for r in records if not r["fallback"] and r["kept"] >= th)
                       / max(1, len(records)), 4) for th in THRESHOLDS}
    print(json.dumps({"cases": len(records), "mean_delta_by_gate": table}))


if __name__ == "__main__":
    main()
