"""Benchmark of `rpo rewrite` (issue 2): prints one JSON line of figures.

Cold: the whole `rpo rewrite` process, model load included. Warm: in-process rewrites with the
model loaded (what the daemon and the TUI see). A ~40-token generic reply, k=4.
Run: .venv/bin/python bench/bench_rewrite.py [--runs N]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--adapter", default="none", help="adapter for the warm runs ('none': the bare model)")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="rpo-bench-")
    os.environ["RPO_HOME"] = home
    env = {**os.environ, "RPO_HOME": home}
    rpo = [sys.executable, "-m", "rpo_local"]
    rpo_bin = str(Path(sys.executable).parent / "rpo")

    help_s = statistics.median(timed([rpo_bin, "--help"], env=env) for _ in range(5))
    subprocess.run([*rpo, "history", "add", "--profile", "alex", "--kind", "chat", *PERSONA], check=True, env=env, capture_output=True)
    cold_s = statistics.median(
        timed([*rpo, "rewrite", "--profile", "alex", "--no-log", "--adapter", args.adapter], input=GENERIC.encode(), env=env)
        for _ in range(3)
    )

    from rpo_local.config import load_config
    from rpo_local.session import open_reflector

    reflector = open_reflector(load_config(), profile="alex", adapter=args.adapter)
    generic_tokens = reflector.engine.count_tokens(GENERIC)
    reflector.rewrite(WARM_REPLIES[-1], "alex", log=False)  # warm-up
    results = [reflector.rewrite(WARM_REPLIES[i % len(WARM_REPLIES)], "alex", log=False) for i in range(args.runs)]
    lat = sorted(r.total_s for r in results)
    prompt_tok = statistics.median(r.prompt_tokens for r in results)
    gen_tok = statistics.median(r.completion_tokens for r in results)
    print(json.dumps({
        "bench": "rewrite",
        "adapter": args.adapter,
        "generic_tokens": generic_tokens,
        "k": reflector.config.k,
        "help_s": round(help_s, 3),
        "cold_rewrite_s": round(cold_s, 3),
        "warm_rewrite_p50_s": round(statistics.median(lat), 3),
        "warm_rewrite_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
        "prompt_tokens": prompt_tok,
        "generated_tokens": gen_tok,
        # Prompt rate: reflection-prompt tokens over time to first token (the shared system
        # prefix comes from the KV cache, so this is the effective rate a user sees).
        "prompt_tok_s": round(sum(r.prompt_tokens for r in results) / sum(r.prompt_s for r in results), 1),
        "gen_tok_s": round(sum(r.completion_tokens for r in results) / sum(r.gen_s for r in results), 1),
        "fallback_share": sum(r.fallback for r in results) / len(results),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "runs": args.runs,
    }))


if __name__ == "__main__":
    main()
