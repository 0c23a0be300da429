"""Style vectors (rpo_local.style): the neutral versions, the control-vector file, applying it in
llama.cpp next to the adapter, and that it steers the real model toward the user's writing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# A lower-case, slangy writer (the demo persona's kind of texts).
SLANGY = [
    "lol ok that meeting could def have been an email", "omg im so tired rn, gonna sleep all weekend",
    "cant wait 4 friday tbh", "ugh my bus was late again lol", "idk what 2 eat tonite, u got ideas?",
    "haha yeah thats so true", "srsly who schedules a call at 8am", "gonna grab coffee brb",
    "ur right, i shouldve asked first lol", "nah im good thx", "wanna watch a movie l8r?",
    "omg the new album is sooo good",
]
SLANG_WORDS = {"lol", "omg", "u", "ur", "im", "gonna", "wanna", "idk", "tbh", "ugh", "haha", "yeah", "thx", "nah"}


def _vector(n_layer: int = 4, n_embd: int = 8, base: str = "ab" * 32):
    from rpo_local.style import StyleVector

    rng = np.random.default_rng(0)
    directions = rng.normal(size=(n_layer, n_embd)).astype(np.float32)
    directions[0] = 0.0
    return StyleVector(directions, base, pairs=5, meta={"profile": "ann"})


def test_plain_version_writes_the_same_words_in_standard_form():
    from rpo_local.style import plain_version, usable_pair

    assert plain_version("lol ok that meeting could def have been an email") == "Okay that meeting could def have been an email."
    assert plain_version("omg im sooo tired!!! gonna sleep... u?") == "I'm so tired! Going to sleep. You?"
    assert plain_version("I LOVE this :)") == "I love this."
    assert plain_version("Already a plain sentence.") == "Already a plain sentence."
    assert not usable_pair("Already a plain sentence.", "Already a plain sentence.")  # no direction in it
    assert usable_pair(SLANGY[0], plain_version(SLANGY[0]))


def test_data_is_the_llama_cpp_buffer_from_layer_1_scaled_inside_the_range():
    v = _vector()
    data = v.data(2.0, (2, 2))
    assert data.dtype == np.float32 and data.shape == (3 * 8,)  # layers 1..3, layer 0 never sent
    assert np.all(data[:8] == 0) and np.all(data[16:] == 0)
    assert np.allclose(data[8:16], 2.0 * v.directions[2])


def test_control_vector_file_round_trip_in_llama_cpp_format(tmp_path):
    from gguf import GGUFReader

    from rpo_local import style

    v = _vector(n_layer=30, n_embd=576)
    path = style.write(v, tmp_path / "v.cvec.gguf")
    back = style.read(path)
    assert np.array_equal(back.directions, v.directions)
    assert back.base_sha256 == v.base_sha256 and back.pairs == 5 and back.meta["profile"] == "ann"
    # What llama.cpp's common_control_vector_load checks: the architecture, and one 1-D f32
    # tensor `direction.<l>` per layer l >= 1, all of the same width.
    reader = GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    names = [t.name for t in reader.tensors]
    assert names == [f"direction.{layer}" for layer in range(1, 30)]
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"} and {tuple(t.shape) for t in reader.tensors} == {(576,)}
    assert np.array_equal(np.asarray(reader.tensors[4].data), v.directions[5])


def test_a_file_that_is_not_a_control_vector_is_refused(tmp_path):
    from rpo_local import style
    from rpo_local.adapters import builtin_adapter_path
    from rpo_local.errors import ModelError

    with pytest.raises(ModelError, match="not a control vector"):
        style.read(builtin_adapter_path())  # a LoRA adapter
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError):
        style.read(tmp_path / "junk.gguf")


def test_writing_is_atomic_and_versions_are_kept_per_profile(monkeypatch):
    from rpo_local import style

    v = _vector()
    first = style.save(v, "ann")
    assert first.name == f"{v.base_sha256[:16]}-v1{style.SUFFIX}"
    before = first.read_bytes()

    def crash(*_args):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(OSError):
            style.save(_vector(n_embd=16), "ann")
    assert first.read_bytes() == before  # the old version is whole
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temporary file left
    for _ in range(style.KEEP + 1):
        last = style.save(v, "ann")
    kept = sorted(p.name for p in first.parent.iterdir())
    assert len(kept) == style.KEEP and last.name == f"{v.base_sha256[:16]}-v{style.KEEP + 2}{style.SUFFIX}"


def test_rewrite_with_style_but_none_built_says_how_to_build_one(cli, store, use_fake_engine):
    store.add_item("ann", "lol ok", kind="chat")
    r = cli("rewrite", "--profile", "ann", "--style", stdin=b"Thank you for the message.")
    assert r.code == 8 and "rpo style build --profile ann" in r.stderr and r.stdout == ""
    r = cli("rewrite", "--profile", "ann", "--no-style", stdin=b"Thank you for the message.")
    assert r.code == 0 and use_fake_engine.style is None


def test_style_build_refuses_an_unknown_profile_and_too_few_texts(cli, store, use_fake_engine, monkeypatch):
    from rpo_local import style

    assert cli("style", "build", "--profile", "nobody").code == 5
    assert cli("style", "build", "--neutral", "magic").code == 3
    for text in ["Plain sentence one.", "Plain sentence two.", "lol ok"]:
        store.add_item("ann", text, kind="chat")
    monkeypatch.setattr(style, "load_torch", lambda _path: (None, None))  # never reached: refused before
    r = cli("style", "build", "--profile", "ann")
    assert r.code == 3 and "at least" in r.stderr and r.stdout == ""


# -- the real model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slangy_vector(model_path):
    from rpo_local import style
    from rpo_local.models import sha256

    model, tok = style.load_torch(model_path)
    pairs = [(t, style.plain_version(t)) for t in SLANGY]
    return style.build(model, tok, pairs, sha256(model_path)), style.build(
        model, tok, [(n, t) for t, n in pairs], sha256(model_path))


def _next_token(engine) -> np.ndarray:
    import llama_cpp

    from rpo_local import prompts

    prompt = prompts.render_chat(engine.chat_template(), [{"role": "user", "content": "Write one sentence about your weekend."}])
    engine.llm.reset()
    engine.llm.eval(engine.llm.tokenize(prompt.encode(), add_bos=True, special=True))
    n_vocab = engine.llm.n_vocab()
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(engine.llm.ctx, -1), shape=(n_vocab,)).astype(np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _vocab_masks(engine) -> tuple[np.ndarray, np.ndarray]:
    pieces = [engine.llm.detokenize([i]).decode(errors="replace").strip() for i in range(engine.llm.n_vocab())]
    lower = np.array([bool(p) and p[0].islower() for p in pieces])
    slang = np.array([p.lower() in SLANG_WORDS for p in pieces])
    return lower, slang


@pytest.mark.model
def test_block_means_are_the_blocks_outputs_llama_cpp_steers(model_path):
    """Block l's output, averaged over a text's tokens but the first, batched and padded, equals
    transformers' hidden_states[l + 1] of the text alone: the vector's row l is what llama.cpp adds
    after block l (`build_cvec(cur, il)` at the end of each layer)."""
    import torch

    from rpo_local import style

    model, tok = style.load_torch(model_path)
    texts = [SLANGY[0], "Hi there.", SLANGY[1] + " and then some more"]
    fast = style.block_means(model, tok, texts, batch_size=2)
    for i, text in enumerate(texts):
        with torch.inference_mode():
            states = model(input_ids=tok(text, return_tensors="pt")["input_ids"], output_hidden_states=True).hidden_states
        for layer in range(len(states) - 2):  # the last entry is after the final norm
            assert np.allclose(fast[i, layer], states[layer + 1][0, 1:].mean(0).numpy(), atol=1e-4)


@pytest.mark.model
def test_a_strong_style_vector_moves_the_next_token_toward_the_users_writing(real_engine, slangy_vector):
    vector, reversed_vector = slangy_vector
    lower, slang = _vocab_masks(real_engine)
    try:
        plain = _next_token(real_engine)
        real_engine.set_style(vector, 0.3, (6, 18))
        steered = _next_token(real_engine)
        real_engine.set_style(reversed_vector, 0.3, (6, 18))
        away = _next_token(real_engine)
    finally:
        real_engine.set_style(None)
    # Unsteered, SmolLM2 starts a sentence with a capital ("I", "On", "My"); steered toward a
    # lower-case, slangy writer it mostly does not, and slang gets far more likely. The vector
    # built the other way round (neutral minus the user's) must not do that: a sign or pairing
    # error fails here.
    assert plain[lower].sum() < 0.05
    assert steered[lower].sum() > 0.3
    assert steered[slang].sum() > 3 * plain[slang].sum()
    assert away[lower].sum() < 0.05
    assert np.allclose(_next_token(real_engine), plain, atol=1e-6)  # off again: exactly the base model


@pytest.mark.model
def test_style_vector_and_adapter_switch_together_without_reloading(real_engine, slangy_vector):
    from rpo_local.adapters import builtin_adapter_path

    vector, _ = slangy_vector
    llm = real_engine.llm
    before = real_engine.adapter_path
    try:
        real_engine.set_adapter(builtin_adapter_path())
        adapter_only = _next_token(real_engine)
        real_engine.set_style(vector, 0.3, (6, 18))
        both = _next_token(real_engine)
        real_engine.set_adapter(None)
        style_only = _next_token(real_engine)
        real_engine.set_adapter(builtin_adapter_path())
        assert np.allclose(_next_token(real_engine), both, atol=1e-6)  # the style stays while adapters switch
    finally:
        real_engine.set_style(None)
        real_engine.set_adapter(before)
    assert real_engine.llm is llm  # never reloaded
    assert np.abs(both - adapter_only).sum() > 0.1 and np.abs(both - style_only).sum() > 0.1


@pytest.mark.model
def test_a_style_vector_for_another_base_is_refused(real_engine, slangy_vector):
    from dataclasses import replace

    from rpo_local.errors import AdapterMismatch, ModelError

    vector, _ = slangy_vector
    with pytest.raises(AdapterMismatch, match="another base model"):
        real_engine.set_style(replace(vector, base_sha256="0" * 64), 1.0, (1, 29))
    assert real_engine.style is None  # nothing changed
    with pytest.raises(ModelError, match="wide"):
        real_engine.set_style(replace(vector, directions=vector.directions[:, :8]), 1.0, (1, 29))
    assert AdapterMismatch.exit_code == 11


@pytest.mark.model
def test_rpo_style_build_then_rewrite_with_style(cli, store):
    from rpo_local import style

    for text in SLANGY:
        store.add_item("ann", text, kind="chat")
    r = cli("style", "build", "--profile", "ann", "--json")
    assert r.code == 0, r
    import json

    doc = json.loads(r.stdout)
    path = Path(doc["path"])
    assert path.is_file() and doc["pairs"] == len(SLANGY) and doc["bytes"] == path.stat().st_size
    assert style.read(path).base_sha256 == doc["base_sha256"]
    r = cli("rewrite", "--profile", "ann", "--style", "--no-log", "--json", stdin=b"Thank you for the message.")
    assert r.code == 0, r
    assert json.loads(r.stdout)["rewrite"]


def test_eval_style_methods_steer_only_their_own_rewrites(tmp_path, monkeypatch):
    """rpo+style and rpo+adapter+style run with the user's vector (built from their profile as
    `rpo style build` does), every other method without it, and the engine ends as it began."""
    import json

    from fakes import FakeEngine

    from rpo_local import evaluate, lamp, style

    built: list[list[tuple[str, str]]] = []
    monkeypatch.setattr(style, "load_torch", lambda _path: ("model", "tok"))
    monkeypatch.setattr(style, "build", lambda _m, _t, pairs, _sha: built.append(pairs) or _vector())
    monkeypatch.setattr("rpo_local.models.sha256", lambda _path: "ab" * 32)
    seen: list[tuple[str | None, object]] = []

    class Recording(FakeEngine):
        def stream(self, prompt, **kwargs):
            if "Generic reply:" in prompt:
                seen.append((str(self.adapter_path) if self.adapter_path else None, self.style))
            return super().stream(prompt, **kwargs)

    row = {"id": "7", "input": "Paraphrase the following tweet without any explanation before or after it: I Am Going To The Beach Today With Friends.",
           "output": "im here lol", "profile": [{"text": t} for t in SLANGY]}
    data_file = tmp_path / "lamp.jsonl"
    data_file.write_text(json.dumps(row) + "\n")
    engine = Recording()
    adapter = tmp_path / "a.gguf"
    adapter.write_bytes(b"GGUF")
    monkeypatch.setattr(evaluate, "_check_adapter", lambda _e, _p: None)
    report = evaluate.run_eval(lamp.load(data_file), engine, methods=["copy", "rpo", "rpo+style", "rpo+adapter",
                                                                       "rpo+adapter+style"], adapter=adapter, k=2)
    assert built == [[(t, style.plain_version(t)) for t in SLANGY]]  # one vector per user
    steered = [(a, s is not None) for a, s in seen]
    expected = [(None, False), (None, True), (str(adapter), False), (str(adapter), True)]
    assert steered == [call for call in expected for _phase in range(2)]  # trajectory, then answer
    assert engine.style is None and engine.adapter_path is None
    assert report.style == "0.05@6-18" and report.settings()["style"] == "0.05@6-18"
    assert report.summary("rpo+style").fallback_share is not None


def test_the_daemon_rebuilds_a_style_vector_in_the_background_when_new_texts_arrive(store, tmp_path):
    """With style on, the scheduler runs `rpo style build` (here a stand-in printing its JSON) for a
    profile with enough texts, never beside a training run, and again only after STYLE_MIN_NEW more."""
    import sys
    import time

    from rpo_local import scheduler
    from rpo_local.config import load_config

    calls = tmp_path / "calls.txt"
    script = tmp_path / "fake_style.py"
    script.write_text("import json, sys\nopen(sys.argv[1], 'a').write(sys.argv[2] + '\\n')\n"
                      "print(json.dumps({'path': '/x/v1.cvec.gguf', 'pairs': 5}))\n")
    config = load_config()
    config.style = True
    config.train_min_new_items = 10_000  # no training is due: only style builds run
    sched = scheduler.TrainScheduler(store, config, command=lambda p: ["false"], persist=False, log_dir=tmp_path,
                                     style=lambda p: [sys.executable, str(script), str(calls), p])

    def settle() -> None:
        sched.tick()
        deadline = time.monotonic() + 60
        while sched._style is not None:
            assert time.monotonic() < deadline, "the style build did not finish"
            time.sleep(0.05)
            sched.tick()

    for text in SLANGY[:3]:
        store.add_item("ann", text, kind="chat")
    settle()
    assert not calls.exists()  # 3 texts: too few for a vector
    for text in SLANGY[3:8]:
        store.add_item("ann", text, kind="chat")
    settle()
    assert calls.read_text().split() == ["ann"]
    assert sched.profile_status("ann")["style"]["status"] == "built"
    store.add_item("ann", SLANGY[8], kind="chat")
    settle()
    assert calls.read_text().split() == ["ann"]  # 1 new text: not yet
    for text in SLANGY[9:] + ["one more", "and another"]:
        store.add_item("ann", text, kind="chat")
    settle()
    assert calls.read_text().split() == ["ann", "ann"]
    config.style = False
    for text in ["a", "b", "c", "d", "e"]:
        store.add_item("ann", f"style is off {text}", kind="chat")
    settle()
    assert calls.read_text().split() == ["ann", "ann"]


def test_paraphrased_neutral_versions_are_made_once_and_shared_with_the_training_cache(store):
    """`--neutral paraphrase`: the bare base model paraphrases each text once (adapter and style off
    meanwhile, restored after); the SFT data builder's cache file holds them for the next build."""
    import json

    from fakes import FakeEngine

    from rpo_local import style

    engine = FakeEngine(lambda prompt: "A Plain Version.")
    engine.adapter_path = Path("some.lora.gguf")
    engine.set_style("vector", 0.5, (2, 3))
    seen: list[tuple] = []
    stream = engine.stream
    engine.stream = lambda prompt, **kw: seen.append((engine.adapter_path, engine.style)) or stream(prompt, **kw)
    for text in SLANGY[:5]:
        store.add_item("ann", text, kind="chat")
    pairs = style.profile_pairs(store, "ann", engine, "paraphrase")
    assert [n for _, n in pairs] == ["A Plain Version."] * 5 and len(seen) == 5
    assert set(seen) == {(None, None)}  # the bare base model
    assert (engine.adapter_path, engine.style, engine.style_scale) == (Path("some.lora.gguf"), "vector", 0.5)
    assert len(json.loads(style.paraphrase_cache_path("ann").read_text())) == 5
    style.profile_pairs(store, "ann", engine, "paraphrase")
    assert len(seen) == 5  # all from the cache
