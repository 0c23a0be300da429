"""Training throughput of the reflection LoRA on this machine; prints ONE JSON line.

    .venv/bin/python bench/bench_train.py [--examples 24] [--steps 4] [--top-layers 10] [--init-adapter A.gguf]

Examples are LaMP-7 users after the first 100 (read from ../shared/data/lamp7 at run time).
The first step is a warm-up and is not timed. Figures: tokens/s (prompt + completion tokens
through forward and backward), seconds per optimizer step, peak RSS, and the projected wall
time for 1,000 examples (one epoch) at the measured rate. With --init-adapter, training continues
from that adapter as per-user training does (its LoRA on its blocks, the top N of them learning).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rpo_local.models import embedded_model_path
from rpo_local.store import Store
from rpo_local.training import dataset, sft

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lamp", type=Path, default=ROOT.parent / "shared" / "data" / "lamp7" / "dev.jsonl")
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--top-layers", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--init-adapter", type=Path, help="continue from this GGUF adapter (per-user training)")
    args = ap.parse_args()

    model_path = embedded_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        with Store.open(Path(tmp) / "r.db") as store:
            rows = dataset.read_lamp(args.lamp, skip=100, limit=args.examples)
            examples = dataset.lamp_examples(rows, store, dataset.gguf_chat_template(model_path))
        t0 = time.perf_counter()
        base = sft.load_base(model_path, args.threads)
        load_s = time.perf_counter() - t0
        cfg = sft.SFTConfig(steps=1, batch_size=args.batch_size, grad_accum=1, top_layers=args.top_layers,
                            threads=args.threads, checkpoint_every=10**9,
                            init_adapter=str(args.init_adapter) if args.init_adapter else None)
        model, _ = sft.train(model_path, examples, Path(tmp) / "warm", cfg, progress=False, base=base)
        cfg.steps = args.steps
        cfg.seed = 1  # another order, another checkpoint fingerprint: no resume
        model, res = sft.train(model_path, examples, Path(tmp) / "run", cfg, progress=False,
                               base=(model.unload(), base[1]))
    tokens_per_example = res.tokens / (res.steps * args.batch_size)
    print(json.dumps({
        "examples_per_step": args.batch_size, "top_layers": args.top_layers, "steps": res.steps,
        "init_adapter": args.init_adapter.name if args.init_adapter else None,
        "tokens_per_s": res.tokens_per_s, "s_per_step": res.s_per_step,
        "tokens_per_example": round(tokens_per_example, 1), "peak_rss_mb": res.peak_rss_mb,
        "model_load_s": round(load_s, 1),
        "projected_s_1000_examples": round(1000 * tokens_per_example / res.tokens_per_s, 0),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
