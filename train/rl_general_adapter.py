"""RL stage for the general reflection adapter: reward-ranked fine-tuning from an SFT adapter.

Samples `--samples` rewrites per training user with the SFT adapter in llama.cpp, rewards
them with ROUGE-1 against the user's real tweet, keeps the best where it beats the generic
text, and fine-tunes the adapter further on those (see rpo_local/training/rl.py).
Training users start after the first 100 (the evaluation users of `rpo eval`).

    nice -n 10 .venv/bin/python train/rl_general_adapter.py --init-adapter train/runs/general/adapter.gguf \
        --offset 0 --examples 300 --out rpo_local/assets/reflect-lamp7.lora.gguf

Writes rollouts.jsonl (every sample and its reward), train.jsonl (the kept trajectories),
checkpoints and summary.json into --run-dir; rerunning resumes from what is there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rpo_local.config import load_config
from rpo_local.engine import LlamaEngine
from rpo_local.fsutil import atomic_write_text
from rpo_local.models import embedded_model_path, sha256
from rpo_local.store import Store
from rpo_local.training import dataset, export, rl, sft

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lamp", type=Path, default=ROOT.parent / "shared" / "data" / "lamp7" / "dev.jsonl")
    ap.add_argument("--init-adapter", type=Path, required=True, help="the SFT adapter to improve")
    ap.add_argument("--examples", type=int, default=300, help="training users (after the first 100)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many training users")
    ap.add_argument("--samples", type=int, default=4, help="rollouts per user")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--margin", type=float, default=0.05, help="reward a kept sample must add over the generic text")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "train" / "runs" / "rl")
    ap.add_argument("--out", type=Path, default=ROOT / "rpo_local" / "assets" / "reflect-lamp7.lora.gguf")
    args = ap.parse_args()

    model_path = embedded_model_path()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    rollout_path = args.run_dir / "rollouts.jsonl"
    if rollout_path.exists():
        rolls = [json.loads(line) for line in rollout_path.read_text(encoding="utf-8").split("\n") if line]
    else:
        rows = dataset.read_lamp(args.lamp, skip=dataset.EVAL_USERS + args.offset, limit=args.examples)
        db = args.run_dir / "retrieval.db"
        db.unlink(missing_ok=True)
        with Store.open(db) as store:
            # Every user, rewrite or not: the reward decides what is learned.
            examples = dataset.lamp_examples(rows, store, dataset.gguf_chat_template(model_path), min_kept=0.0)
        engine = LlamaEngine(model_path, n_ctx=2048, adapter_path=args.init_adapter)
        t0 = time.perf_counter()

        def progress(done: int, total: int) -> None:
            eta = (time.perf_counter() - t0) / done * (total - done)
            print(f"rollouts {done}/{total}, ETA {eta:.0f}s", file=sys.stderr, flush=True)

        rolls = [asdict(r) for r in rl.rollouts(engine, examples, load_config(), n=args.samples,
                                                        temperature=args.temperature, on_progress=progress)]
        atomic_write_text(rollout_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rolls))
    rollouts = [rl.Rollout(dataset.Example(**r["example"]), r["baseline"], [rl.Sample(**s) for s in r["samples"]])
                for r in rolls]
    kept = rl.select(rollouts, args.margin)
    figures = rl.summary(rollouts, kept)
    print(json.dumps(figures), file=sys.stderr)
    dataset.write_jsonl(args.run_dir / "train.jsonl", kept)

    cfg = sft.SFTConfig(rank=8, alpha=16.0, lr=args.lr, epochs=args.epochs, batch_size=4, grad_accum=2,
                        threads=1, top_layers=10, checkpoint_every=5, init_adapter=str(args.init_adapter))
    t0 = time.perf_counter()
    model, result = sft.train(model_path, kept, args.run_dir, cfg)
    export.export_gguf(model, args.out, meta={
        "base_sha256": sha256(model_path),
        "data": f"LaMP-7 dev users {dataset.EVAL_USERS + args.offset}+ (RL: {len(kept)} of {len(rollouts)} kept)",
    })
    summary = {"adapter": str(args.out), "rollouts": figures, "config": cfg.__dict__,
               "train": result.to_dict(), "wall_s": round(time.perf_counter() - t0, 1)}
    (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in summary["train"].items() if k != "losses"}))


if __name__ == "__main__":
    main()
