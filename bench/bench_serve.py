"""Benchmark `rpo serve`: the latency the proxy adds over calling the upstream directly, sustained
requests per minute, and the daemon's RSS at rest and under load. Prints one JSON line.

Everything runs on loopback: a fake upstream answering a fixed ~40-token reply, and the real
daemon (`python -m rpo_local serve`, embedded model) in a separate process with its own
RPO_HOME. The profile's history is one LaMP-7 user's tweets, read at run time when the data
is there (../shared/data/lamp7/dev.jsonl), else a few built-in lines.

    .venv/bin/python bench/bench_serve.py [--requests 10] [--clients 3] [--per-client 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Fixed generic replies of ~40 tokens, one per question, so every request differs (as real
# traffic does: only the prompt's common prefix can come from the KV cache) while a direct call
# and a proxied call with the same question get the same reply. With the LaMP-7 data present they
# are neutral tweet paraphrases of other users (the domain of the built-in adapter) joined to
# ~40 tokens; otherwise this template.
REPLY = (
    "Thanks for reaching out about the {topic}! I have reviewed it and it looks solid overall. I "
    "would suggest tightening the timeline section and adding a short summary. Let me know if you "
    "want me to look at a revised draft."
)
TOPICS = ["proposal", "weekend plan", "new song", "birthday party", "football match", "road trip",
          "science project", "holiday photos", "job offer", "garden", "concert", "blog post"]
FALLBACK_HISTORY = ["ok cool, see u at 5", "lol yeah that works for me", "nah im good thx, maybe next week?"]
LAMP7 = Path(__file__).resolve().parents[2] / "shared" / "data" / "lamp7" / "dev.jsonl"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class _Upstream(ThreadingHTTPServer):
    request_queue_size = 64
    daemon_threads = True


def lamp_users(n: int) -> list[dict]:
    if not LAMP7.is_file():
        return []
    with LAMP7.open(encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh, strict=False)]


def lamp_replies(users: list[dict]) -> list[str]:
    """Consecutive neutral paraphrases joined until a reply has ~22 words (~40 tokens)."""
    replies, words = [], []
    for user in users:
        words += user["input"].split(": ", 1)[-1].split()
        if len(words) >= 22:
            replies.append(" ".join(words))
            words = []
    return replies


USERS = lamp_users(1 + 4 * len(TOPICS))
if USERS:
    REPLIES = dict(zip(TOPICS, lamp_replies(USERS[1:]), strict=False))
else:
    REPLIES = {t: REPLY.format(topic=t) for t in TOPICS}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        reply = REPLIES[body["messages"][-1]["content"]]
        data = json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": "fixed",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 40, "total_tokens": 50},
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def history() -> list[str]:
    return [p["text"] for p in USERS[0]["profile"]] if USERS else FALLBACK_HISTORY


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def reply_tokens() -> float | None:
    """Mean tokens of the generic replies, by the model's tokenizer."""
    try:
        import llama_cpp

        from rpo_local.models import embedded_model_path

        vocab = llama_cpp.Llama(str(embedded_model_path()), vocab_only=True, verbose=False)
        return round(statistics.mean(len(vocab.tokenize(r.encode(), add_bos=False)) for r in REPLIES.values()), 1)
    except Exception:  # the figure is informative only
        return None


def full_trajectory_s(adapter: Path | None, runs: int = 2) -> float:
    """What a complete rewrite costs the reflection model here, whether or not it answers usefully:
    the reflection prompt read with a cold cache, then the full trajectory budget plus an answer as
    long as the reply (end of turn ignored), in-process with the daemon stopped."""
    from rpo_local import prompts
    from rpo_local.config import Config
    from rpo_local.engine import LlamaEngine
    from rpo_local.models import embedded_model_path

    engine = LlamaEngine(embedded_model_path(), n_ctx=2048, adapter_path=adapter)
    reply = REPLIES[TOPICS[0]]
    prompt = prompts.reflection_prompt(engine.chat_template(), reply, history()[:4])
    tokens = engine.llm.tokenize(prompt.encode(), add_bos=False, special=True)
    budget = Config().trajectory_tokens + engine.count_tokens(reply)
    times = []
    for _ in range(runs):
        engine.llm.reset()
        t0 = time.perf_counter()
        for n, _token in enumerate(engine.llm.generate(tokens, temp=0.0), 1):  # never stops by itself
            if n == budget:
                break
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 3)


LOAD_AT_START = round(os.getloadavg()[0], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=6, help="sequential requests for the latency figures")
    ap.add_argument("--clients", type=int, default=2, help="concurrent clients in the load phase")
    ap.add_argument("--per-client", type=int, default=2, help="requests per client in the load phase")
    ap.add_argument("--adapter", type=Path, help="LoRA GGUF to activate for the profile (a trained one)")
    args = ap.parse_args()

    import openai

    from rpo_local.store import Store

    home = tempfile.mkdtemp(prefix="rpo-bench-serve-")
    env = {**os.environ, "RPO_HOME": home, "NO_COLOR": "1", "ORT_DISABLE_TELEMETRY": "1"}
    os.environ["RPO_HOME"] = home
    with Store.open() as store:
        store.add_items("default", [{"text": t, "kind": "post"} for t in history()])
        if args.adapter:
            store.set_active_adapter("default", store.register_adapter("bench", args.adapter.resolve(), profile="default"))
    upstream = _Upstream(("127.0.0.1", 0), _Handler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    up_url = f"http://127.0.0.1:{upstream.server_address[1]}/v1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "rpo_local", "serve", "--port", str(port), "--upstream", up_url,
           "--no-train", "--timeout", "300"]
    daemon = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        result = _measure(daemon, port, up_url, args, openai)
    finally:
        daemon.terminate()
        daemon.wait(30)
        upstream.shutdown()
    with Store.open() as store:
        reasons = [r["fallback_reason"] for r in store.db.query("select fallback_reason from interactions where fallback = 1")]
    result["fallback_reasons"] = {r: reasons.count(r) for r in sorted(set(reasons), key=str)}
    result["reply_tokens_mean"] = reply_tokens()
    result["replies"] = "LaMP-7 neutral paraphrases" if USERS else "built-in template"
    from rpo_local.adapters import builtin_adapter_path

    adapter = args.adapter or builtin_adapter_path()  # the one the daemon ran with
    result["adapter"] = adapter.name if adapter else None
    result["full_trajectory_compute_s_p50"] = full_trajectory_s(adapter)
    result["load_avg_1m_at_start"] = LOAD_AT_START  # other jobs on the machine skew the figures
    print(json.dumps(result))


def _measure(daemon: subprocess.Popen, port: int, up_url: str, args: argparse.Namespace, openai) -> dict:
    import httpx

    start = time.monotonic()
    while True:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited: {daemon.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    log(f"daemon ready in {time.monotonic() - start:.1f} s")
    time.sleep(1.0)
    rss_rest = rss_mb(daemon.pid)
    direct = openai.OpenAI(base_url=up_url, api_key="x", max_retries=0)
    proxy = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    topics = iter(TOPICS * 100)

    def ask() -> list[dict]:
        return [{"role": "user", "content": next(topics)}]

    proxy.chat.completions.create(model="gpt-x", messages=ask())  # warm-up
    added, personalized = [], 0
    for i in range(args.requests):
        messages = ask()
        t0 = time.perf_counter()
        direct.chat.completions.create(model="gpt-x", messages=messages)
        t1 = time.perf_counter()
        reply = proxy.chat.completions.create(model="gpt-x", messages=messages)
        t2 = time.perf_counter()
        added.append((t2 - t1) - (t1 - t0))
        personalized += bool(reply.rpo["personalized"])
        log(f"request {i + 1}/{args.requests}: +{added[-1]:.2f} s")
    rss_rest_warm = rss_mb(daemon.pid)

    peak = [rss_rest_warm]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak.append(rss_mb(daemon.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()

    def client(_: int) -> int:
        for _ in range(args.per_client):
            proxy.chat.completions.create(model="gpt-x", messages=ask())
        return args.per_client

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        total = sum(pool.map(client, range(args.clients)))
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    status = httpx.get(f"http://127.0.0.1:{port}/v1/rpo/status").json()
    return {
        "bench": "serve",
        "added_latency_p50_s": round(statistics.median(added), 3),
        "added_latency_p95_s": round(pct(added, 0.95), 3),
        "latency_requests": len(added),
        "personalized": f"{personalized}/{len(added)}",
        "requests_per_minute": round(total / elapsed * 60, 1),
        "load": {"clients": args.clients, "requests": total, "seconds": round(elapsed, 1)},
        "rss_mb_at_rest": round(rss_rest, 1),
        "rss_mb_at_rest_warm": round(rss_rest_warm, 1),
        "rss_mb_under_load_peak": round(max(peak), 1),
        "daemon_fallbacks": status["requests"]["generic"],
    }


if __name__ == "__main__":
    main()
