"""Back-translation: the neutralizer's data, augmented examples, batched paraphrasing in torch."""

from __future__ import annotations

import pytest
from fakes import SMOLLM2_TEMPLATE, FakeEngine

from rpo_local import prompts
from rpo_local.store import digest
from rpo_local.training import backtranslate, dataset

EOT = "<|im_end|>"  # SmolLM2's end of turn (prompts.end_of_turn of its template)


def _row(uid: str, neutral: str, output: str, profile: list[str]) -> dict:
    return {"id": uid, "input": f"Paraphrase the following tweet without any explanation before or after it: {neutral}",
            "output": output, "profile": [{"text": t} for t in profile]}


def test_neutralizer_learns_the_user_text_to_neutral_direction():
    rows = [
        _row("1", "I am very tired today.", "so tired 2day lol", []),
        _row("2", "The weather is lovely.", "off to the gym, bye", []),  # not a rewrite: left out
    ]
    examples = backtranslate.neutralizer_examples(rows, SMOLLM2_TEMPLATE)
    assert len(examples) == 1
    ex = examples[0]
    assert ex.prompt == prompts.render_chat(SMOLLM2_TEMPLATE, prompts.neutral_paraphrase_messages("so tired 2day lol"))
    assert ex.completion == "I am very tired today." + EOT


def test_augmented_examples_skip_copies_and_inventions_and_never_see_their_target(store):
    items = ["walking the dog lol", "the dog is walking again lol", "pizza w/ the crew", "so tired 2day"]
    rows = [_row("7", "x", "y", items)]
    paraphrases = {
        digest(items[0]): "I am walking the dog.",
        digest(items[1]): "the dog is walking again lol",  # a copy teaches nothing
        digest(items[2]): "The stock market fell sharply.",  # keeps none of it: invented
    }  # items[3] has no paraphrase
    examples = backtranslate.augmented_examples(rows, paraphrases, store, SMOLLM2_TEMPLATE, per_user=4, k=4)
    assert [ex.target for ex in examples] == [items[0]]
    ex = examples[0]
    assert ex.generic == "I am walking the dog." and ex.user == "lamp-7"
    assert items[0] not in ex.context and set(ex.context) <= set(items[1:]) and ex.context
    assert prompts.parse_trajectory(prompts.assistant_prefix() + ex.completion).answer == items[0]
    # per_user bounds the items used as targets, not the history retrieved from
    assert backtranslate.augmented_examples(rows, paraphrases, store, SMOLLM2_TEMPLATE, per_user=0) == []


def test_paraphrase_cache_round_trips(tmp_path):
    texts = ["a b c", "d e\u2028f"]  # a line separator inside a tweet must not split the file
    path = backtranslate.write_paraphrases(tmp_path / "p.jsonl", texts, ["A", "D"])
    assert backtranslate.read_paraphrases(path) == {digest("a b c"): "A", digest("d e\u2028f"): "D"}
    assert backtranslate.profile_texts([_row("1", "x", "y", ["one", " ", "two", "three"])], 2) == ["one", "two"]


def _neutral_of(prompt: str) -> str:
    """A fake base model that paraphrases by upper-casing the text it is asked about."""
    text = prompt.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
    return text.split("after it: ", 1)[-1].upper()


def test_base_model_paraphrases_are_cached_as_they_come_and_resume(tmp_path):
    texts = ["walking the dog lol", "so tired 2day", "so tired 2day"]
    calls: list[str] = []

    def flaky(prompt: str) -> str:
        calls.append(prompt)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second paraphrase
        return _neutral_of(prompt)

    cache = tmp_path / "p.jsonl"
    with pytest.raises(KeyboardInterrupt):
        backtranslate.paraphrase_with_engine(FakeEngine(flaky), texts, cache, progress=False)
    first = backtranslate.read_paraphrases(cache)
    assert list(first) == [digest(texts[0])]  # the finished one survived the interruption
    engine = FakeEngine(_neutral_of)
    done = backtranslate.paraphrase_with_engine(engine, texts, cache, progress=False)
    assert len(engine.prompts) == 1  # only the missing text, and the repeated one once
    assert done == backtranslate.read_paraphrases(cache) == {digest(t): t.upper() for t in texts}
    assert engine.prompts[0] == prompts.render_chat(SMOLLM2_TEMPLATE, prompts.neutral_paraphrase_messages(texts[1]))


def test_a_paraphrase_runs_about_as_long_as_its_text():
    """A base model that answers instead of paraphrasing is cut at twice the text's tokens."""
    engine = FakeEngine(lambda prompt: "Sure! " + "and more " * 200)
    text = "so tired 2day"
    budget = 2 * engine.count_tokens(text) + 8
    assert dataset.paraphrase(engine, text) == ("Sure! " + "and more " * 200)[: 3 * budget].strip()  # 3 chars a token
    assert dataset.paraphrase(engine, text, max_tokens=2) == "Sure!"


@pytest.mark.model
@pytest.mark.train
def test_batched_paraphrases_match_one_at_a_time(model_path):
    """Left padding must not change a greedy continuation: each text paraphrased in a batch
    with a much longer one reads exactly as when paraphrased alone."""
    from rpo_local.training import sft

    model, tok = sft.load_base(model_path)
    template = dataset.gguf_chat_template(model_path)
    texts = ["omg so tired 2day", "I can't believe the bus was late again this morning, I waited forty minutes"]
    batched = backtranslate.paraphrase_batch(model, tok, template, texts, batch_size=2,
                                             max_new_tokens=12, progress=False)
    alone = [backtranslate.paraphrase_batch(model, tok, template, [t], batch_size=1,
                                            max_new_tokens=12, progress=False)[0] for t in texts]
    assert batched == alone
    assert all(p.strip() for p in batched) and "<|im_end|>" not in "".join(batched)


@pytest.mark.model
@pytest.mark.train
@pytest.mark.parametrize("paraphraser", ["neutralizer", "base"])
def test_build_general_adapter_with_back_translation(tmp_path, lamp7, paraphraser):
    """train/build_general_adapter.py --augment, tiny: paraphrases (by a neutralizer trained
    first, or by the base model in llama.cpp), the mixed dataset, one SFT step, an adapter that
    llama.cpp loads."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from rpo_local.lora_runtime import verify_adapter
    from rpo_local.models import embedded_model_path

    root = Path(__file__).resolve().parents[1]
    run, out = tmp_path / "run", tmp_path / "a.gguf"
    proc = subprocess.run(
        [sys.executable, "train/build_general_adapter.py", "--lamp", str(lamp7), "--examples", "4",
         "--augment", "2", "--neutralizer-epochs", "0.5", "--steps", "1", "--batch-size", "2",
         "--top-layers", "2", "--paraphraser", paraphraser, "--run-dir", str(run), "--out", str(out)],
        capture_output=True, text=True, cwd=root, timeout=900, env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cache = run / ("paraphrases.jsonl" if paraphraser == "neutralizer" else "paraphrases-base.jsonl")
    paraphrased = [json.loads(line) for line in cache.read_text().splitlines()]
    rows = dataset.read_lamp(lamp7, skip=100, limit=4)
    assert [p["text"] for p in paraphrased] == backtranslate.profile_texts(rows, 2)
    examples = dataset.read_jsonl(run / "train.jsonl")
    gold = {r["output"].strip() for r in rows}
    augmented = [ex for ex in examples if ex.target not in gold]
    assert augmented and all(ex.target in {p["text"] for p in paraphrased} for ex in augmented)
    assert (run / "neutralizer.lora.gguf").is_file() == (paraphraser == "neutralizer")
    if paraphraser == "base":  # the product's own paraphrase, by the bare base model
        from rpo_local.engine import open_engine

        engine = open_engine(model=embedded_model_path())
        assert [p["paraphrase"] for p in paraphrased[:2]] == [dataset.paraphrase(engine, p["text"]) for p in paraphrased[:2]]
    verify_adapter(embedded_model_path(), out)
