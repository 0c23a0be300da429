"""Train the general reflection adapter shipped as rpo_local/assets/reflect-lamp7.lora.gguf.

Training users: LaMP-7 dev users AFTER the first 100 (users 0-99 are the evaluation users of
`rpo eval`: neither their gold outputs nor their profiles enter training).

    nice -n 10 .venv/bin/python train/build_general_adapter.py --examples 600 --out rpo_local/assets/reflect-lamp7.lora.gguf

With --augment N, up to N history items per training user become examples too (back-
translation, see rpo_local/training/backtranslate.py): a neutralizer LoRA is trained on the
reversed LaMP pairs, paraphrases the items (cached in --paraphrases), and the reflection LoRA
learns from the LaMP pairs (repeated --gold-repeat times) and the paraphrased items. That is
~17x the data; on a GPU (--device cuda) the whole run takes minutes. On a CPU, with a base model
that paraphrases well zero-shot (Qwen2.5 1.5B does, SmolLM2-135M does not), --paraphraser base
skips the neutralizer: the base model paraphrases in llama.cpp, ~1.5 s a tweet on two cores.

Writes the dataset (JSONL, inspectable), checkpoints (resumable: rerun the same command) and
a summary JSON into --run-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rpo_local import prompts
from rpo_local.models import resolve_model_path, sha256
from rpo_local.store import Store, digest
from rpo_local.training import backtranslate, dataset, export, sft

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lamp", type=Path, default=ROOT.parent / "shared" / "data" / "lamp7" / "dev.jsonl")
    ap.add_argument("--model", type=Path, default=None, help="base GGUF (default: the embedded model)")
    ap.add_argument("--examples", type=int, default=600, help="training users (after the first 100)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many training users (continuation runs)")
    ap.add_argument("--init-adapter", type=Path, default=None, help="start from this GGUF adapter")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--top-layers", type=int, default=10, help="LoRA on the top N blocks (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    ap.add_argument("--format", choices=prompts.FORMATS, default=prompts.DEFAULT_FORMAT,
                    help="trajectory format the adapter learns (recorded in it)")
    ap.add_argument("--k", type=int, default=4, help="history items in each prompt")
    ap.add_argument("--min-kept", type=float, default=dataset.MIN_TARGET_KEPT,
                    help="keep LaMP pairs whose tweet keeps this share of the neutral text's content words")
    ap.add_argument("--augment", type=int, default=0, help="history items per user to back-translate (0: off)")
    ap.add_argument("--gold-repeat", type=int, default=1, help="times the LaMP pairs appear in the data")
    ap.add_argument("--paraphraser", choices=("neutralizer", "base"), default="neutralizer",
                    help="who writes the generic versions of history items: a neutralizer LoRA trained "
                         "on the reversed pairs, or the bare base model zero-shot in llama.cpp")
    ap.add_argument("--neutralizer-epochs", type=float, default=3.0)
    ap.add_argument("--paraphrases", type=Path, default=None, help="paraphrase cache (JSONL; default in --run-dir)")
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "train" / "runs" / "general")
    ap.add_argument("--out", type=Path, default=ROOT / "rpo_local" / "assets" / "reflect-lamp7.lora.gguf")
    args = ap.parse_args()

    model_path = resolve_model_path(args.model)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    rows = dataset.read_lamp(args.lamp, skip=dataset.EVAL_USERS + args.offset, limit=args.examples)
    data_path = args.run_dir / "train.jsonl"
    if data_path.exists():
        examples = dataset.read_jsonl(data_path)
    else:
        examples = build_examples(args, rows, model_path)
        dataset.write_jsonl(data_path, examples)
    print(f"{len(examples)} examples -> {data_path}", file=sys.stderr)

    cfg = sft_config(args, epochs=args.epochs, steps=args.steps,
                     init_adapter=str(args.init_adapter) if args.init_adapter else None)
    t0 = time.perf_counter()
    model, result = sft.train(model_path, examples, args.run_dir, cfg)
    export.export_gguf(model, args.out, meta={
        "base_sha256": sha256(model_path),
        "trajectory": args.format,
        "data": f"LaMP-7 dev users {dataset.EVAL_USERS + args.offset}+ (n={len(examples)}, augment={args.augment})",
    })
    summary = {"adapter": str(args.out), "bytes": args.out.stat().st_size, "config": cfg.__dict__,
               "train": result.to_dict(), "wall_s": round(time.perf_counter() - t0, 1),
               "base_sha256": sha256(model_path)}
    (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in summary["train"].items() if k != "losses"}))


def sft_config(args: argparse.Namespace, **run: object) -> sft.SFTConfig:
    return sft.SFTConfig(rank=args.rank, alpha=2.0 * args.rank, lr=args.lr, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, threads=args.threads, top_layers=args.top_layers,
                         device=args.device, checkpoint_every=args.checkpoint_every, **run)


def build_examples(args: argparse.Namespace, rows: list[dict], model_path: Path) -> list[dataset.Example]:
    template = dataset.gguf_chat_template(model_path)
    for name in ("retrieval.db", "augment.db"):
        (args.run_dir / name).unlink(missing_ok=True)
    with Store.open(args.run_dir / "retrieval.db") as store:
        examples = dataset.lamp_examples(rows, store, template, k=args.k, min_kept=args.min_kept,
                                         fmt=args.format) * args.gold_repeat
    if args.augment:
        paraphrases = paraphrase_history(args, rows, model_path, template)
        with Store.open(args.run_dir / "augment.db") as store:
            extra = backtranslate.augmented_examples(rows, paraphrases, store, template, per_user=args.augment,
                                                     k=args.k, fmt=args.format)
        print(f"{len(extra)} back-translated examples", file=sys.stderr)
        examples += extra
    return examples


def paraphrase_history(args: argparse.Namespace, rows: list[dict], model_path: Path, template: str) -> dict:
    """Paraphrase the history items (cached) with the base model, or a neutralizer trained first.
    The two write different default caches: a half-done one of either is never taken for the other's."""
    texts = backtranslate.profile_texts(rows, args.augment)
    if args.paraphraser == "base":
        return paraphrase_with_base(args, model_path, texts)
    cache = args.paraphrases or args.run_dir / "paraphrases.jsonl"
    if cache.exists():
        return backtranslate.read_paraphrases(cache)
    pairs = backtranslate.neutralizer_examples(rows, template)
    cfg = sft_config(args, epochs=args.neutralizer_epochs)
    base = sft.load_base(model_path, args.threads, args.device)
    model, result = sft.train(model_path, pairs, args.run_dir / "neutralizer", cfg, base=base)
    export.export_gguf(model, args.run_dir / "neutralizer.lora.gguf",
                       meta={"base_sha256": sha256(model_path), "data": "LaMP-7 pairs reversed"})
    print(f"neutralizer: {len(pairs)} pairs, final loss {result.final_loss}", file=sys.stderr)
    out = backtranslate.paraphrase_batch(model, base[1], template, texts,
                                         batch_size=256 if args.device != "cpu" else 8)
    backtranslate.write_paraphrases(cache, texts, out)
    return {digest(t): p for t, p in zip(texts, out, strict=True)}


def paraphrase_with_base(args: argparse.Namespace, model_path: Path, texts: list[str]) -> dict:
    import dataclasses

    from rpo_local.config import load_config
    from rpo_local.engine import open_engine

    engine = open_engine(dataclasses.replace(load_config(), n_threads=args.threads), model=model_path)
    cache = args.paraphrases or args.run_dir / "paraphrases-base.jsonl"
    return backtranslate.paraphrase_with_engine(engine, texts, cache)  # the engine is freed before training


if __name__ == "__main__":
    main()
