"""Decoding beyond greedy, measured on tuning users: choose among several rewrites of each text.

For each LaMP user (tuning users 946-1045 by default; never the evaluation users 0-99), the
product's own rewrite (`Reflector.rewrite`: retrieval, the adapter's gate and piece size) is
written once greedily and `--samples` times sampled at `--temperature`, and saved to `--out`
(JSON lines; a rerun with the same settings resumes). Then each selection rule picks one of
them per user:

- greedy: what `rpo rewrite` prints today;
- consensus: minimum-Bayes-risk decoding, the candidate with the highest mean ROUGE-1 against
  all candidates (the greedy one wins ties);
- consensus + generic: the same, with the generic text among the candidates it may pick;
- retry: where greedy gives no rewrite (a fallback, or the generic text itself), the first
  sample that is one;
- agreement gate T: greedy where its mean ROUGE-1 against the samples is at least T, else the
  generic text;
- oracle: the best candidate with the user's own text known (the headroom; not a rule).

The table gives, per rule, ROUGE-1 and its paired difference (95% bootstrap interval over
users) to copy and to greedy, and the share of texts rewritten.

    .venv/bin/python train/sweep_decoding.py --model .models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --adapter rpo_local/assets/reflect-lamp7-qwen1.5b.lora.gguf --out runs/decoding.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from rpo_local import lamp
from rpo_local.config import load_config
from rpo_local.engine import open_engine
from rpo_local.evaluate import PROFILE, load_profile, paired_bootstrap, rouge, user_store
from rpo_local.fsutil import atomic_write_text
from rpo_local.reflect import Reflector

ROOT = Path(__file__).resolve().parents[1]
Rule = Callable[[dict], str]


def r1(a: str, b: str) -> float:
    return rouge(a, b)[0]


def run_settings(args: argparse.Namespace) -> dict:
    """What makes candidates comparable: every row of an --out file was written with these."""
    settings = {"model": Path(args.model).name, "adapter": args.adapter.name, "samples": args.samples,
                "temperature": args.temperature, "retriever": args.retriever, "k": args.k}
    scope = load_config().retrieval_scope  # recorded unless per piece, as files before the key were written
    return settings if scope == "piece" else {**settings, "retrieval_scope": scope}


def saved_rows(path: Path, settings: dict) -> dict[str, dict]:
    """The rows already in `path` by user id. A line cut short by a crash is dropped (the file is
    rewritten without it); rows written with other settings are refused (ValueError)."""
    if not path.exists():
        return {}
    rows: dict[str, dict] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row.get("settings") != settings:
            raise ValueError(f"{path} holds candidates written with other settings ({row.get('settings')}); "
                             "give another --out file")
        rows[row["id"]] = row
    if len(rows) < len(lines):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()))
    return rows


def collect(args: argparse.Namespace) -> list[dict]:
    """The candidates of every selected user, written to `args.out` for those not there yet."""
    data = lamp.load_jsonl(args.lamp)
    users = lamp.select(data.users, offset=args.offset, limit=args.n)
    settings = run_settings(args)
    rows = saved_rows(args.out, settings)
    todo = [u for u in users if str(u.id) not in rows]
    if todo:
        config = replace(load_config(), retriever=args.retriever, k=args.k, temperature=0.0)
        engine = open_engine(config, model=args.model, adapter=args.adapter)
        decodings = [config] + [replace(config, temperature=args.temperature, seed=1000 + i)
                                for i in range(1, args.samples + 1)]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="rpo-decoding-") as tmp:
            for user in tqdm(todo, desc="users", unit="user"):
                generic = lamp.query_text(data.task, user.input).strip()
                with user_store(Path(tmp) / "user.db") as store:
                    load_profile(store, data.task, user, config.retriever)
                    results = [Reflector(store, engine, cfg).rewrite(generic, PROFILE, k=args.k, log=False)
                               for cfg in decodings]
                row = rows[str(user.id)] = {
                    "id": str(user.id), "settings": settings, "generic": generic, "gold": user.output,
                    "candidates": [{"text": r.rewrite.strip(), "fallback": r.fallback} for r in results],
                }
                with args.out.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return [rows[str(u.id)] for u in users]


def consensus(candidates: list[str], hypotheses: list[str]) -> str:
    """The hypothesis with the highest mean ROUGE-1 against the candidates (first wins ties)."""
    return max(hypotheses, key=lambda h: sum(r1(h, c) for c in candidates))


def same_text(a: str, b: str) -> bool:
    return a.split() == b.split()


def rewritten(row: dict, cand: dict) -> bool:
    return not cand["fallback"] and not same_text(cand["text"], row["generic"])


def retry(row: dict) -> str:
    return next((c["text"] for c in row["candidates"] if rewritten(row, c)), row["generic"])


def agreement_gate(threshold: float) -> Rule:
    def rule(row: dict) -> str:
        greedy, *samples = (c["text"] for c in row["candidates"])
        agree = sum(r1(greedy, s) for s in samples) / max(1, len(samples))
        return greedy if agree >= threshold else row["generic"]
    return rule


def texts(row: dict) -> list[str]:
    return [c["text"] for c in row["candidates"]]


RULES: dict[str, Rule] = {
    "greedy": lambda row: texts(row)[0],
    "consensus": lambda row: consensus(texts(row), texts(row)),
    "consensus + generic": lambda row: consensus(texts(row), [*texts(row), row["generic"]]),
    "retry": retry,
    "agreement gate 0.5": agreement_gate(0.5),
    "agreement gate 0.6": agreement_gate(0.6),
    "oracle (gold known)": lambda row: max(texts(row), key=lambda t: r1(t, row["gold"])),
}


def interval(value: tuple[float, float, float]) -> str:
    return f"{value[0]:+.4f} [{value[1]:+.4f}, {value[2]:+.4f}]"


def table(rows: list[dict]) -> str:
    copy = [r1(row["generic"], row["gold"]) for row in rows]
    greedy = [r1(texts(row)[0], row["gold"]) for row in rows]
    lines = [f"{len(rows)} users, {len(rows[0]['candidates'])} candidates each; copy {sum(copy) / len(copy):.4f}",
             "| rule | ROUGE-1 | vs copy | vs greedy | rewritten |", "|---|---:|---:|---:|---:|"]
    for name, rule in RULES.items():
        picks = [rule(row) for row in rows]
        scores = [r1(p, row["gold"]) for p, row in zip(picks, rows, strict=True)]
        share = sum(not same_text(p, row["generic"]) for p, row in zip(picks, rows, strict=True)) / len(rows)
        lines.append(f"| {name} | {sum(scores) / len(scores):.4f} | {interval(paired_bootstrap(scores, copy))} | "
                     f"{interval(paired_bootstrap(scores, greedy))} | {share:.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lamp", type=Path, default=ROOT.parent / "shared" / "data" / "lamp7" / "dev.jsonl")
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--offset", type=int, default=946, help="first user (946: the tuning users)")
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--retriever", default="bm25")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True, help="candidates (JSON lines; a rerun with the same settings resumes)")
    args = ap.parse_args()
    if args.offset < 100:
        ap.error("users 0-99 are the evaluation users: choose decoding on others")
    if args.samples < 1 or args.n < 1:
        ap.error("-n and --samples must be at least 1")
    try:
        rows = collect(args)
    except ValueError as exc:
        ap.error(str(exc))
    print(table(rows))


if __name__ == "__main__":
    main()
