"""Benchmark of retrieval (issue 18): prints one JSON document of figures.

- Embedding throughput (texts/s) of all-MiniLM-L6-v2 on ONNX Runtime, fp32 vs int8, on LaMP-7
  tweets (short texts, as history items mostly are).
- Agreement of int8 with fp32: for the tuning users 946-1045, each user's tweets are the history
  and the neutral `input` text is the query; the share of the fp32 top-k that int8 also returns,
  with every vector int8 and as the runtime does it (fp32 items, an int8 query), and the mean
  cosine between the two vectors of a text.
- Retrieval latency p50/p95 over synthetic histories of 10k and 100k items (tweets of users
  100-1045 cycled): `retrieve()` end to end for bm25, dense and hybrid (query embedding included;
  hybrid also with the text's vector cached), the exact and the HNSW search alone, the time to
  load a profile's matrix from SQLite (once per change) and to build its HNSW graph, and the
  graph's recall@k against exact search, queried with the tuning users' inputs.
- The items' vectors are real-ish: mixtures of two of `--realish` embedded LaMP-7 tweets (users
  100-1045) plus noise, so they cluster as a history's texts do. Random unit vectors, which the
  bench used before, have no neighbourhoods: a graph search wanders (0.24 recall, 2-3x slower).

Texts are read from ../shared/data/lamp7/ at run time and never printed or copied; users 0-99
(evaluation) are not used. Run: nice -n 19 .venv/bin/python bench/bench_retrieve.py [--lamp FILE] [--latency-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EVAL_USERS = 100
TUNE = slice(946, 1046)


def percentiles(samples: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples)
    return {"p50_ms": round(statistics.median(ms), 3), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 3)}


def throughput(embedder, texts: list[str]) -> float:
    embedder.encode(texts[:64])  # warm-up
    start = time.perf_counter()
    embedder.encode(texts)
    return round(len(texts) / (time.perf_counter() - start), 1)


def agreement(fp32, int8, users, k: int) -> dict:

    overlaps, mixed, cosines = [], [], []
    for user in users:
        history = [e["text"] for e in user.profile]
        query = user.input.split(":", 1)[-1].strip()
        a, b = fp32.encode([*history, query]), int8.encode([*history, query])
        cosines.extend((a * b).sum(axis=1).tolist())
        n = min(k, len(history))
        want = _top(a[:-1], a[-1], n)
        overlaps.append(len(want & _top(b[:-1], b[-1], n)) / n)
        mixed.append(len(want & _top(a[:-1], b[-1], n)) / n)
    return {"users": len(users), "k": k, "top_k_overlap": round(statistics.mean(overlaps), 3),
            "top_k_overlap_fp32_items_int8_query": round(statistics.mean(mixed), 3),
            "mean_cosine": round(statistics.mean(cosines), 4)}


def _top(items, query, n: int) -> set[int]:
    import numpy as np

    return set(np.argsort(-(items @ query))[:n].tolist())


def timed(fn, runs: int) -> dict:
    samples = []
    for i in range(runs):
        t = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t)
    return percentiles(samples)


def recall(index, queries, k: int) -> float:
    """Share of exact search's top k that the HNSW graph's search returns too."""
    graph, index.graph = index.graph, None
    exact = [set(index.top(q, k)) for q in queries]
    index.graph = graph
    return round(statistics.mean(len(set(index.top(q, k)) & e) / k for q, e in zip(queries, exact, strict=True)), 3)


def mixtures(real, size: int):
    """`size` unit vectors, each two of the `real` ones (the second at half weight) plus noise."""
    import numpy as np

    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(real), (size, 2))
    noise = rng.standard_normal((size, real.shape[1])).astype(np.float32) * 0.02
    matrix = real[pairs[:, 0]] + 0.5 * real[pairs[:, 1]] + noise
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def latency(pool: list[str], queries: list[str], vectors, embedder, k: int, runs: int) -> dict:
    import numpy as np

    from rpo_local import embed
    from rpo_local.retrieve import APPROX_FROM, _dense_index, _query_vector, retrieve
    from rpo_local.store import Store

    size = len(vectors)
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp) / "bench.db", durable=False) as store:
        ids = store.add_items("bench", [{"text": f"{pool[i % len(pool)]} #{i}"} for i in range(size)])
        store.put_embeddings(embedder.model_id, zip(ids, embed._blobs(vectors), strict=True))
        pid = store.get_profile("bench").id
        t = time.perf_counter()
        index = _dense_index(store, pid, "bench")
        load_s = time.perf_counter() - t
        out: dict = {"items": size, "k": k, "index_load_ms": round(load_s * 1000, 1)}
        index.building = True  # no background build: the bench builds the graph itself, timed
        qvecs = np.stack([embedder.encode_query(q) for q in queries])
        out["exact_search_only"] = timed(lambda i: index.top(qvecs[i % len(qvecs)], k), runs)
        if size >= APPROX_FROM:
            t = time.perf_counter()
            index.build()
            out["hnsw_build_s"] = round(time.perf_counter() - t, 1)
            out["hnsw_search_only"] = timed(lambda i: index.top(qvecs[i % len(qvecs)], k), runs)
            out["hnsw_recall_at_k"] = recall(index, qvecs, k)
        out["query_embedding"] = timed(lambda i: embedder.encode_query(queries[i % len(queries)]), runs)

        def fresh(retriever: str):  # the query's embedding included: no cached vector
            return lambda i: (_query_vector.cache_clear(), retrieve(store, "bench", queries[i % len(queries)], k, retriever))

        for retriever in ("bm25", "dense", "hybrid"):
            out[retriever] = timed(fresh(retriever), runs)
        samples = []
        for i in range(runs):  # hybrid after dense on the same text: its vector is cached
            retrieve(store, "bench", queries[i % len(queries)], k, "dense")
            t = time.perf_counter()
            retrieve(store, "bench", queries[i % len(queries)], k, "hybrid")
            samples.append(time.perf_counter() - t)
        out["hybrid_after_dense_same_text"] = percentiles(samples)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("RPO_LAMP7", ROOT.parent / "shared" / "data" / "lamp7" / "dev.jsonl"))
    ap.add_argument("--lamp", type=Path, default=default)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--texts", type=int, default=2000, help="texts embedded per throughput figure")
    ap.add_argument("--runs", type=int, default=200, help="queries per latency figure")
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--latency-only", action="store_true", help="skip throughput and int8 agreement")
    ap.add_argument("--realish", type=int, default=3000, help="tweets embedded for the items' real-ish vectors")
    args = ap.parse_args()
    if args.realish < 2:
        ap.error("--realish: at least 2 tweets (each item's vector mixes two)")
    os.environ.setdefault("RPO_HOME", tempfile.mkdtemp(prefix="rpo-bench-"))  # keep the user's cache

    from rpo_local import embed, lamp

    users = lamp.load(args.lamp).users
    pool = [e["text"] for u in users[EVAL_USERS:] for e in u.profile]
    queries = [u.input.split(":", 1)[-1].strip() for u in users[TUNE]]
    t = time.perf_counter()
    embed.export()
    export_s = time.perf_counter() - t
    fp32 = embed.Embedder("fp32", threads=args.threads)
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "provider": fp32.provider,
                    "threads": args.threads or "default"},
        "export_s": round(export_s, 1),
    }
    if not args.latency_only:
        int8 = embed.Embedder("int8", threads=args.threads)
        texts = pool[: args.texts]
        report["texts_per_s"] = {"fp32": throughput(fp32, texts), "int8": throughput(int8, texts)}
        report["int8_vs_fp32"] = agreement(fp32, int8, users[TUNE], args.k)
    real = fp32.encode(pool[: args.realish])
    report["latency"] = [latency(pool, queries, mixtures(real, int(n)), embed.get_embedder(), args.k, args.runs)
                         for n in args.sizes.split(",")]
    report["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
