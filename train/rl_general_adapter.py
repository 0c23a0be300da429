"""RL stage for the general reflection adapter: reward-ranked fine-tuning from an SFT adapter.

Each round samples `--samples` rewrites per training example with the current adapter, rewards
them with ROUGE-1 against the user's real tweet, keeps the best where it beats the generic text
by `--margin`, and fine-tunes the adapter further on those (see rpo_local/training/rl.py).
Training users start after the first 100 (the evaluation users of `rpo eval`).

On a CPU, rollouts run in llama.cpp over the LaMP pairs:

    nice -n 10 .venv/bin/python train/rl_general_adapter.py --init-adapter train/runs/general/adapter.gguf \
        --examples 300 --out rpo_local/assets/reflect-lamp7.lora.gguf

On a GPU (--device cuda) they run batched in torch, `--budget-s` seconds per round, over the
LaMP pairs and back-translated history items (--augment N, with the paraphrase cache of a build
run: --paraphrases);
`--val N` holds the last N training users out and scores them (greedy, content gate on)
before and after each round:

    .venv/bin/python train/rl_general_adapter.py --device cuda --init-adapter A.gguf --examples 946 \
        --augment 40 --paraphrases train/runs/bt/paraphrases.jsonl --val 100 --rounds 2 --budget-s 150 \
        --top-layers 0 --lr 2e-4 --epochs 1 --batch-size 32 --grad-accum 1

--method grpo is the paper's RL stage instead: one round per stage of --curriculum (k = 1, 2, 4,
8 retrieved items in the prompt), each sampling --samples trajectories per example in llama.cpp
with the adapter as it is, then one GRPO pass over them (group-relative advantages, a KL term of
weight --beta to the --init-adapter policy; rl.grpo_update). Rollouts are cached per round, the
policy is not: a rerun starts over.

    nice -n 10 .venv/bin/python train/rl_general_adapter.py --method grpo --init-adapter A.gguf \
        --examples 40 --samples 4 --run-dir train/runs/grpo --out grpo.gguf

Writes lamp.jsonl, augment.jsonl and val.jsonl (the examples; reused when present), per round rollouts and
the kept trajectories, checkpoints, round{R}.gguf and summary.json into --run-dir; --out gets
the last round's adapter.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rpo_local import adapters
from rpo_local.config import load_config
from rpo_local.fsutil import atomic_write_text
from rpo_local.models import resolve_model_path, sha256
from rpo_local.store import Store
from rpo_local.training import backtranslate, dataset, export, pipeline, rl, sft

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lamp", type=Path, default=ROOT.parent / "shared" / "data" / "lamp7" / "dev.jsonl")
    ap.add_argument("--model", type=Path, default=None, help="base GGUF (default: the embedded model)")
    ap.add_argument("--init-adapter", type=Path, required=True, help="the SFT adapter to improve")
    ap.add_argument("--examples", type=int, default=300, help="training users (after the first 100)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many training users")
    ap.add_argument("--augment", type=int, default=0, help="back-translated history items per user (0: none)")
    ap.add_argument("--paraphrases", type=Path, default=None, help="their paraphrase cache (build_general_adapter.py)")
    ap.add_argument("--val", type=int, default=0, help="hold out the last N training users and score them")
    ap.add_argument("--method", choices=["raft", "grpo"], default="raft")
    ap.add_argument("--curriculum", default=",".join(map(str, rl.CURRICULUM)),
                    help="grpo: retrieved items in the prompt per round")
    ap.add_argument("--beta", type=float, default=rl.GRPOConfig.beta, help="grpo: weight of the KL term")
    ap.add_argument("--k", type=int, default=4, help="raft: retrieved items in the prompt")
    ap.add_argument("--rounds", type=int, default=1, help="raft")
    ap.add_argument("--samples", type=int, default=4, help="rollouts per example")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--margin", type=float, default=0.05, help="reward a kept sample must add over the generic text")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds of rollouts per round (torch)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=None, help=f"raft: 5e-4; grpo: {rl.GRPOConfig.lr}")
    ap.add_argument("--top-layers", type=int, default=10, help="blocks whose LoRA learns (0: all)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or mps (training, and torch rollouts)")
    ap.add_argument("--engine", choices=["llama", "torch"], default=None,
                    help="rollouts in llama.cpp or batched in torch (default: llama on cpu, else torch)")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "train" / "runs" / "rl")
    ap.add_argument("--out", type=Path, default=ROOT / "rpo_local" / "assets" / "reflect-lamp7.lora.gguf")
    args = ap.parse_args()

    model_path = resolve_model_path(args.model)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    args.engine = args.engine or ("llama" if args.device == "cpu" else "torch")
    args.curriculum = [int(k) for k in args.curriculum.split(",")]
    if args.method == "grpo":
        args.k = max(args.curriculum)
    args.lr = args.lr or (rl.GRPOConfig.lr if args.method == "grpo" else 5e-4)
    # The format the init adapter was trained on (`rpo train`'s rule): its prompts, its
    # completions, and the format recorded in every adapter written here.
    args.format = pipeline.training_format(load_config(), args.init_adapter)
    lamp, extra, val = examples(args, model_path)
    print(f"{len(lamp)} LaMP pairs + {len(extra)} history items to sample, {len(val)} to validate",
          file=sys.stderr)
    scored = validate(model_path, args, args.init_adapter, val) if val else None
    if args.method == "grpo":
        return grpo(args, model_path, lamp + extra, val, scored)
    adapter, at, rounds = args.init_adapter, 0, []
    for r in range(1, args.rounds + 1):
        # Every round samples all LaMP pairs, then the history items where the last round stopped.
        pool = lamp + extra[at:] + extra[:at]
        trained, figures = one_round(args, model_path, adapter, pool, val, r)
        if trained is None:
            break
        adapter = trained
        at = (at + max(0, figures["rollouts"]["examples"] - len(lamp))) % max(1, len(extra))
        rounds.append(figures)
        report(args, scored, rounds)
    if rounds:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(adapter, args.out)


def report(args: argparse.Namespace, scored: dict | None, rounds: list[dict]) -> None:
    """The last round's figures on stdout; every round's in summary.json."""
    print(json.dumps(rounds[-1]), flush=True)
    summary = {"method": args.method, "init_adapter": str(args.init_adapter), "val_before": scored, "rounds": rounds}
    atomic_write_text(args.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))


def grpo(args: argparse.Namespace, model_path: Path, pool: list[dataset.Example], val: list[dataset.Example],
         scored: dict | None) -> None:
    """The curriculum: per stage k, rollouts with the adapter as it is, then one GRPO pass."""
    from rpo_local.engine import LlamaEngine

    template = dataset.gguf_chat_template(model_path)
    cfg = rl.GRPOConfig(beta=args.beta, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        device=args.device)
    model, tok = adapter_model(model_path, args, args.init_adapter)
    ref, optim = sft.trainable_state(model), rl.grpo_optimizer(model, cfg)
    adapter, rounds = args.init_adapter, []
    gate = adapters.setting(load_config(), "min_content_kept", args.init_adapter)
    engine = LlamaEngine(model_path, n_ctx=2048, adapter_path=adapter)
    for r, k in enumerate(args.curriculum, start=1):
        t0 = time.perf_counter()
        stage = [rl.with_context(ex, k, template) for ex in pool]
        engine.set_adapter(adapter)
        rolls = rl.sampled_rollouts(engine, stage, template, n=args.samples, temperature=args.temperature,
                                    min_kept=gate, seed=1000 * r, on_progress=progress_printer())
        write_rollouts(args.run_dir / f"rollouts{r}.jsonl", rolls)
        sampled = {key: v for key, v in rl.summary(rolls, []).items() if key != "kept"}  # kept: RAFT's
        figures: dict = {"round": r, "k": k, "rollouts": sampled,
                         "rollout_s": round(time.perf_counter() - t0, 1)}
        figures["train"] = rl.grpo_update(model, tok, rolls, ref, optim, cfg)
        adapter = export.export_gguf(model, args.run_dir / f"round{r}.gguf", meta={
            "base_sha256": sha256(model_path), "trajectory": args.format,
            "data": f"LaMP-7 dev users {dataset.EVAL_USERS + args.offset}+, GRPO round {r} (k={k})",
        })
        figures["val"] = score(model, tok, val, model_path) if val else None
        figures["wall_s"] = round(time.perf_counter() - t0, 1)
        rounds.append(figures)
        report(args, scored, rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(adapter, args.out)


def one_round(args: argparse.Namespace, model_path: Path, adapter: Path, pool: list[dataset.Example],
              val: list[dataset.Example], r: int) -> tuple[Path | None, dict]:
    """Rollouts with `adapter`, the kept ones trained on: (the new adapter or None, figures)."""
    t0 = time.perf_counter()
    rolls = rollouts(args, model_path, adapter, pool, r)
    kept = rl.select(rolls, args.margin)
    figures: dict = {"round": r, "rollouts": rl.summary(rolls, kept),
                     "rollout_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(figures), file=sys.stderr, flush=True)
    dataset.write_jsonl(args.run_dir / f"kept{r}.jsonl", kept)
    if not kept:
        print(f"round {r}: no rollout beat the generic text by {args.margin}; stopping", file=sys.stderr)
        return None, figures
    cfg = sft.SFTConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        top_layers=args.top_layers, device=args.device, checkpoint_every=50,
                        init_adapter=str(adapter), seed=r)
    base = sft.load_base(model_path, device=args.device)
    model, result = sft.train(model_path, kept, args.run_dir / f"round{r}", cfg, base=base)
    trained = export.export_gguf(model, args.run_dir / f"round{r}.gguf", meta={
        "base_sha256": sha256(model_path), "trajectory": args.format,
        "data": f"LaMP-7 dev users {dataset.EVAL_USERS + args.offset}+, RL round {r}: {len(kept)}/{len(rolls)} kept",
    })
    figures["train"] = {k: v for k, v in result.to_dict().items() if k != "losses"}
    figures["val"] = score(model, base[1], val, model_path) if val else None
    figures["wall_s"] = round(time.perf_counter() - t0, 1)
    return trained, figures


def examples(args: argparse.Namespace, model_path: Path) -> tuple[list, list, list]:
    """(LaMP pairs, back-translated history items, validation pairs), built once and kept in
    --run-dir. Every training user's LaMP pair is sampled, rewrite or not: the reward decides
    what is learned. The --val users are neither sampled nor trained on."""
    paths = [args.run_dir / f"{name}.jsonl" for name in ("lamp", "augment", "val")]
    if all(p.exists() for p in paths):
        cached = tuple(dataset.read_jsonl(p) for p in paths)
        if all(ex.fmt == args.format for part in cached for ex in part):
            return cached
    rows = dataset.read_lamp(args.lamp, skip=dataset.EVAL_USERS + args.offset, limit=args.examples)
    held = {str(row["id"]) for row in rows[len(rows) - args.val:]} if args.val else set()
    train_rows = [row for row in rows if str(row["id"]) not in held]
    template = dataset.gguf_chat_template(model_path)
    for name in ("retrieval.db", "augment.db"):
        (args.run_dir / name).unlink(missing_ok=True)
    with Store.open(args.run_dir / "retrieval.db") as store:
        lamp = dataset.lamp_examples(rows, store, template, k=args.k, min_kept=0.0, fmt=args.format)
    extra: list[dataset.Example] = []
    if args.augment:
        paraphrases = backtranslate.read_paraphrases(args.paraphrases or args.run_dir / "paraphrases.jsonl")
        with Store.open(args.run_dir / "augment.db") as store:
            extra = backtranslate.augmented_examples(train_rows, paraphrases, store, template,
                                                     per_user=args.augment, k=args.k, fmt=args.format)
        random.Random(0).shuffle(extra)
    out = ([ex for ex in lamp if ex.user not in held], extra, [ex for ex in lamp if ex.user in held])
    for path, part in zip(paths, out, strict=True):
        dataset.write_jsonl(path, part)
    return out


def rollouts(args: argparse.Namespace, model_path: Path, adapter: Path,
             pool: list[dataset.Example], r: int) -> list[rl.Rollout]:
    """This round's rollouts with `adapter`: in llama.cpp on a CPU, in torch on a GPU."""
    path = args.run_dir / f"rollouts{r}.jsonl"
    if path.exists():
        return [rl.Rollout(dataset.Example(**d["example"]), d["baseline"], [rl.Sample(**s) for s in d["samples"]])
                for d in map(json.loads, path.read_text(encoding="utf-8").split("\n")[:-1])]
    config = load_config()
    if args.engine == "llama":
        rolls = llama_rollouts(args, model_path, adapter, pool, config)
    else:
        model, tok = adapter_model(model_path, args, adapter)
        deadline = time.monotonic() + args.budget_s if args.budget_s else None
        rolls = rl.torch_rollouts(model, tok, pool, dataset.gguf_chat_template(model_path), n=args.samples, temperature=args.temperature,
                                  min_kept=adapters.setting(config, "min_content_kept", None), deadline=deadline, seed=r)
    write_rollouts(path, rolls)
    return rolls


def write_rollouts(path: Path, rolls: list[rl.Rollout]) -> None:
    atomic_write_text(path, "".join(json.dumps(asdict(x), ensure_ascii=False) + "\n" for x in rolls))


def progress_printer() -> Callable[[int, int], None]:
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        eta = (time.perf_counter() - t0) / done * (total - done)
        print(f"rollouts {done}/{total}, ETA {eta:.0f}s", file=sys.stderr, flush=True)

    return progress


def llama_rollouts(args: argparse.Namespace, model_path: Path, adapter: Path,
                   pool: list[dataset.Example], config: Any) -> list[rl.Rollout]:
    from rpo_local.engine import LlamaEngine

    engine = LlamaEngine(model_path, n_ctx=2048, adapter_path=adapter)
    return rl.rollouts(engine, pool, config, n=args.samples, temperature=args.temperature,
                       on_progress=progress_printer())


def adapter_model(model_path: Path, args: argparse.Namespace, adapter: Path) -> tuple[Any, Any]:
    """The base model in torch with `adapter` loaded, on --device."""
    model, tok = sft.load_base(model_path, device=args.device)
    model, _ = sft.with_lora(model, sft.SFTConfig(init_adapter=str(adapter), top_layers=args.top_layers))
    return model, tok


def validate(model_path: Path, args: argparse.Namespace, adapter: Path, val: list[dataset.Example]) -> dict:
    model, tok = adapter_model(model_path, args, adapter)
    figures = score(model, tok, val, model_path)
    print(json.dumps({"val": str(adapter), **figures}), flush=True)
    return figures


def score(model: Any, tok: Any, val: list[dataset.Example], model_path: Path) -> dict:
    """Greedy rewrites of the validation examples with the runtime's content gate: mean
    ROUGE-1 of what `rpo rewrite` would print, against keeping the generic text."""
    rolls = rl.torch_rollouts(model, tok, val, dataset.gguf_chat_template(model_path), n=1, temperature=0.0, min_kept=adapters.setting(load_config(), "min_content_kept", None),
                              progress=False)
    figures = rl.summary(rolls, [])
    return {"copy": figures["baseline_reward"], "rpo": figures["best_reward"],
            "fell_back": figures["fallback_share"], "n": figures["examples"]}


if __name__ == "__main__":
    main()
