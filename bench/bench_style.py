"""Choosing the style vector's layers and scale on the tuning users (946-1045). Prints JSON lines.

A full `rpo eval` per setting (greedy rewrites, ~100 generated tokens a user with the full
trajectory) costs minutes a user on this shared 2-core VM, so settings are compared by what
steering is for: how likely the reflection model (the shipped adapter, loaded in torch from its
GGUF) makes the user's real tweet (LaMP's gold) as the answer to rewriting its neutral version,
given the user's retrieved tweets and the trajectory the training data would give it. For each
user the vector is built from their profile as `rpo style build` does (rule-made neutral
versions, `rpo_local.style`), then added in torch after the same blocks llama.cpp steers. The
figure is the mean over users of the gold answer's mean log-probability per token, and its
paired difference to no vector with a 95% bootstrap interval.

Run: nice -n 19 .venv/bin/python bench/bench_style.py --offset 946 -n 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from rpo_local import lamp, prompts, style
from rpo_local.adapters import builtin_adapter_path
from rpo_local.evaluate import paired_bootstrap
from rpo_local.models import embedded_model_path, sha256
from rpo_local.retrieve import retrieve
from rpo_local.store import Store
from rpo_local.training import dataset
from rpo_local.training.sft import SFTConfig, fit_to_adapter, with_lora

SETTINGS = [(0.02, (1, 29)), (0.05, (1, 29)), (0.1, (1, 29)), (0.05, (6, 18)), (0.1, (6, 18)), (0.2, (6, 18)),
            (0.3, (10, 14))]


def answer_logprob(model, tok, prefix: str, answer: str, steer: tuple | None) -> float:
    """Mean log-probability per token of `answer` after `prefix`, with `steer` = (directions,
    scale, (first, last)) added to the blocks' outputs."""
    import torch

    handles = []
    if steer is not None:
        directions, scale, (first, last) = steer
        for layer, block in enumerate(style._blocks(model)):
            if first <= layer <= last:
                add = torch.from_numpy(directions[layer] * scale)
                handles.append(block.register_forward_hook(
                    lambda _m, _a, out, add=add: (out[0] + add, *out[1:]) if isinstance(out, tuple) else out + add))
    try:
        start = len(tok(prefix, add_special_tokens=False)["input_ids"])
        ids = tok(prefix + answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        targets = ids[0, 1:]
        picked = logp[torch.arange(len(targets)), targets][start - 1 :]
        return float(picked.mean())
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/lamp7/dev.jsonl")
    parser.add_argument("--offset", type=int, default=946)
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("-k", type=int, default=4)
    args = parser.parse_args()
    if args.offset < 100:
        raise SystemExit("users 0-99 are for evaluation only")
    model_path = embedded_model_path()
    model, tok = style.load_torch(model_path)
    template = dataset.gguf_chat_template(model_path)
    cfg = fit_to_adapter(SFTConfig(init_adapter=str(builtin_adapter_path(model_path))), model.config.num_hidden_layers)
    model, _ = with_lora(model, cfg)
    model.eval()
    base = sha256(model_path)
    users = lamp.select(lamp.load(args.data).users, offset=args.offset, limit=args.n)
    scores: dict[str, list[float]] = {"none": []}
    build_s = []
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp) / "s.db", durable=False) as store:
        for n, user in enumerate(users):
            texts = [t for t in (lamp.item_text("LaMP_7", e).strip() for e in user.profile) if t]
            start = time.perf_counter()
            try:
                with model.disable_adapter():  # vectors come from the bare base, as at run time
                    vector = style.build(model, tok, [(t, style.plain_version(t)) for t in texts], base)
            except Exception as exc:  # too few usable texts: the user is left out of every setting
                print(json.dumps({"user": user.id, "skipped": str(exc)}), flush=True)
                continue
            build_s.append(time.perf_counter() - start)
            name = f"u{n}"
            store.add_items(name, [{"text": t, "kind": "tweet"} for t in texts])
            generic = lamp.query_text("LaMP_7", user.input)
            items = [h["text"] for h in retrieve(store, name, generic, args.k)]
            ex = dataset.make_example(template, name, generic, user.output, items, "full")
            head, _, tail = ex.completion.partition(prompts.ANSWER_OPEN)
            prefix, answer = ex.prompt + head + prompts.ANSWER_OPEN, tail.split(prompts.ANSWER_CLOSE)[0] + prompts.ANSWER_CLOSE
            scores["none"].append(answer_logprob(model, tok, prefix, answer, None))
            for scale, layers in SETTINGS:
                key = f"{scale}@{layers[0]}-{layers[1]}"
                scores.setdefault(key, []).append(
                    answer_logprob(model, tok, prefix, answer, (vector.directions, scale, layers)))
            if (n + 1) % 10 == 0 or n + 1 == len(users):  # a running summary: the last line is the result
                print(json.dumps(summary(scores, build_s)), flush=True)


def summary(scores: dict[str, list[float]], build_s: list[float]) -> dict:
    out = {"users": len(scores["none"]), "build_s_mean": round(float(np.mean(build_s)), 3), "settings": {}}
    for key, values in scores.items():
        row = {"logprob": round(float(np.mean(values)), 4)}
        if key != "none":
            row["vs_none"] = [round(x, 4) for x in paired_bootstrap(values, scores["none"], resamples=2000)]
        out["settings"][key] = row
    return out


if __name__ == "__main__":
    main()
