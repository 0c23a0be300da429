"""Benchmark of `rpo rewrite` (issues 2 and 17): prints one JSON line of figures.

Cold: the whole `rpo rewrite` process, model load included. Warm: in-process rewrites with the
model loaded (what the daemon and the TUI see). A ~40-token generic reply, k=4.

Side by side in the same run, so that the ratios hold on a noisy machine, each warm rewrite is
followed by the same rewrite without speculative decoding and by raw llama.cpp
(`Llama.create_completion` on the same reflection prompt in the adapter's format, same model and
adapter, greedy, exactly as many tokens as the rewrite generated: end-of-generation tokens are
forbidden by a logit bias, else it stops early and the ratio compares unequal work; the bias
costs raw a copy of the logits per token, by estimate well under 1% of a token's time here), each on its
own loaded model so every one sees the KV cache the previous reply left (the shared
system-prompt prefix), as in real use.
Run: .venv/bin/python bench/bench_rewrite.py [--runs N] [--adapter PATH|none] [--model GGUF]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERIC = (ROOT / "demo" / "generic-reply.txt").read_text()
# Warm runs rotate through different ~40-token replies so no run gets a full-prompt cache hit
# (only the shared system-prompt prefix is reused, as in real use).
WARM_REPLIES = [
    GENERIC,
    "I will be about fifteen minutes late to the meeting because of heavy traffic. Please start without me and I will catch up when I arrive.",
    "That is a great idea. We should discuss it in more detail tomorrow morning, ideally before the planning session, so that we can prepare a proposal.",
    "The build failed because a dependency was updated overnight. I have pinned the previous version, and the tests are passing again on the main branch.",
    "Thank you for the invitation. Unfortunately, I am not available on Saturday evening, but I would be happy to join you for lunch next week instead.",
]
PERSONA = [p.strip() for p in (ROOT / "demo" / "persona-alex.txt").read_text().split("\n\n") if p.strip()]


def timed(cmd: list[str], **kw) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, **kw)
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def raw_llama(engine):
    """A second llama.cpp instance configured as `engine`'s, with the same adapter."""
    import llama_cpp

    from rpo_local import lora_runtime

    own = engine.llm
    llm = llama_cpp.Llama(
        model_path=str(engine.model_path), n_ctx=engine.n_ctx, n_batch=own.n_batch,
        n_ubatch=own.context_params.n_ubatch, n_threads=own.context_params.n_threads,
        n_threads_batch=own.context_params.n_threads_batch, n_gpu_layers=own.model_params.n_gpu_layers,
        verbose=False,
    )
    if engine.adapter_path:
        lora_runtime.apply_adapter(llm, lora_runtime.load_adapter(llm, engine.adapter_path), 1.0)
    return llm


def no_end_of_generation(llm) -> dict[int, float]:
    """A logit bias that forbids every end-of-generation token, so raw llama.cpp generates as many
    tokens as it is asked for (the rewrite's count), not fewer where the model would stop."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return {t: float("-inf") for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}


def compare(reflector, plain, raw, runs: int) -> dict:
    """rpo (speculative), rpo without speculation and raw llama.cpp, one after the other per reply."""
    from rpo_local import prompts
    from rpo_local.retrieve import retrieve

    spec_engine = reflector.engine
    rows = []
    stats0 = (spec_engine.decode_stats.drafted, spec_engine.decode_stats.accepted)
    template, fmt = spec_engine.chat_template(), reflector.trajectory_format()
    never_stop = no_end_of_generation(raw)
    for i in range(runs):
        text = WARM_REPLIES[i % len(WARM_REPLIES)]
        r = reflector.rewrite(text, "alex", log=False)
        p = plain.rewrite(text, "alex", log=False)
        items = [it["text"] for it in retrieve(reflector.store, "alex", text, reflector.config.k)]
        prompt = prompts.reflection_prompt(template, text, items, fmt)
        start = time.perf_counter()
        first, raw_tokens = None, 0
        for _ in raw.create_completion(prompt, max_tokens=r.completion_tokens, temperature=0.0,
                                       logit_bias=never_stop, stream=True):
            first, raw_tokens = first or time.perf_counter(), raw_tokens + 1
        raw_s = time.perf_counter() - start
        rows.append({
            "rpo_s": r.total_s, "plain_s": p.total_s, "raw_s": raw_s, "raw_prompt_s": (first or start) - start,
            "tokens": r.completion_tokens, "raw_tokens": raw_tokens, "prompt_s": r.prompt_s,
            "same_output": r.rewrite == p.rewrite, "gen_s": r.gen_s, "plain_gen_s": p.gen_s,
        })
    drafted = spec_engine.decode_stats.drafted - stats0[0]
    accepted = spec_engine.decode_stats.accepted - stats0[1]
    ratio = [row["rpo_s"] / row["raw_s"] for row in rows]
    plain_ratio = [row["plain_s"] / row["raw_s"] for row in rows]
    return {
        "rpo_over_raw_p50": round(statistics.median(ratio), 3),
        "rpo_over_raw_range": [round(min(ratio), 3), round(max(ratio), 3)],
        "plain_over_raw_p50": round(statistics.median(plain_ratio), 3),
        "raw_p50_s": round(statistics.median(row["raw_s"] for row in rows), 3),
        "plain_rewrite_p50_s": round(statistics.median(row["plain_s"] for row in rows), 3),
        "raw_tokens": statistics.median(row["raw_tokens"] for row in rows),
        # Where the time goes: reading prompts (to the first token) in rpo and in raw, and rpo's
        # own work outside llama.cpp (retrieval, segmenting, prompt building, the content checks).
        "rpo_prompt_p50_s": round(statistics.median(row["prompt_s"] for row in rows), 3),
        "raw_prompt_p50_s": round(statistics.median(row["raw_prompt_s"] for row in rows), 3),
        "rpo_outside_llama_p50_s": round(statistics.median(
            row["rpo_s"] - row["prompt_s"] - row["gen_s"] for row in rows), 4),
        "draft_acceptance": round(accepted / drafted, 3) if drafted else None,
        "drafted_tokens": drafted,
        # Generation after the first token, over all phases of the rewrite.
        "gen_tok_s_speculative": round(sum(row["tokens"] for row in rows) / sum(row["gen_s"] for row in rows), 1),
        "gen_tok_s_plain": round(sum(row["tokens"] for row in rows) / sum(row["plain_gen_s"] for row in rows), 1),
        "same_output_share": sum(row["same_output"] for row in rows) / len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--adapter", default="none", help="adapter for the warm runs ('none': the bare model)")
    ap.add_argument("--model", default=None, help="reflection GGUF (default: the configured/embedded one)")
    ap.add_argument("--no-cold", action="store_true", help="skip the process timings (help, cold rewrite)")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="rpo-bench-")
    os.environ["RPO_HOME"] = home
    if args.model:
        os.environ["RPO_MODEL"] = args.model
    env = {**os.environ, "RPO_HOME": home}
    rpo = [sys.executable, "-m", "rpo_local"]
    rpo_bin = str(Path(sys.executable).parent / "rpo")

    subprocess.run([*rpo, "history", "add", "--profile", "alex", "--kind", "chat", *PERSONA], check=True, env=env, capture_output=True)
    figures: dict = {}
    if not args.no_cold:
        figures["help_s"] = round(statistics.median(timed([rpo_bin, "--help"], env=env) for _ in range(5)), 3)
        figures["cold_rewrite_s"] = round(statistics.median(
            timed([*rpo, "rewrite", "--profile", "alex", "--no-log", "--adapter", args.adapter], input=GENERIC.encode(), env=env)
            for _ in range(3)
        ), 3)

    from rpo_local.config import load_config
    from rpo_local.reflect import Reflector
    from rpo_local.session import open_reflector

    config = load_config()
    reflector = open_reflector(config, profile="alex", adapter=args.adapter)
    engine = reflector.engine
    generic_tokens = engine.count_tokens(GENERIC)
    reflector.rewrite(WARM_REPLIES[-1], "alex", log=False)  # warm-up
    results, reused = [], []
    for i in range(args.runs):
        before = engine.decode_stats.reused
        results.append(reflector.rewrite(WARM_REPLIES[i % len(WARM_REPLIES)], "alex", log=False))
        reused.append(engine.decode_stats.reused - before)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the comparison models load
    lat = [r.total_s for r in results]

    from rpo_local.engine import open_engine

    plain_engine = open_engine(config, adapter=engine.adapter_path)
    plain_engine.speculative = False
    plain = Reflector(reflector.store, plain_engine, config)
    raw = raw_llama(engine)
    plain.rewrite(WARM_REPLIES[-1], "alex", log=False)
    raw.create_completion("Hello", max_tokens=1)
    side_by_side = compare(reflector, plain, raw, args.runs)

    print(json.dumps({
        "bench": "rewrite",
        "model": engine.model_path.name,
        "adapter": args.adapter,
        "speculative": engine.speculative,
        "threads": engine.llm.context_params.n_threads,
        "generic_tokens": generic_tokens,
        "k": reflector.config.k,
        "retrieval_scope": reflector.config.retrieval_scope,
        **figures,
        "warm_rewrite_p50_s": round(statistics.median(lat), 3),
        "warm_rewrite_p95_s": round(pct(lat, 0.95), 3),
        "prompt_tokens": statistics.median(r.prompt_tokens for r in results),
        "generated_tokens": statistics.median(r.completion_tokens for r in results),
        "pieces": statistics.median(len(r.pieces) for r in results),
        # Prompt tokens taken from the KV cache per rewrite (prefixes shared with the call before).
        "prompt_tokens_reused": statistics.median(reused),
        # Prompt rate: reflection-prompt tokens over time to first token (the shared system
        # prefix comes from the KV cache, so this is the effective rate a user sees).
        "prompt_tok_s": round(sum(r.prompt_tokens for r in results) / sum(r.prompt_s for r in results), 1),
        "gen_tok_s": round(sum(r.completion_tokens for r in results) / sum(r.gen_s for r in results), 1),
        "fallback_share": sum(r.fallback for r in results) / len(results),
        **side_by_side,
        "peak_rss_mb": round(peak_rss, 1),
        "runs": args.runs,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
