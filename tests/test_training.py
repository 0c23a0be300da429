"""Training data, the `rpo train` verbs, and one real end-to-end SFT run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import SMOLLM2_TEMPLATE, FakeEngine

from rpo_local import prompts, text
from rpo_local.store import digest
from rpo_local.training import dataset

EOT = "<|im_end|>"  # SmolLM2's end of turn (prompts.end_of_turn of its template)

ROOT = Path(__file__).resolve().parents[1]


def _parse(ex: dataset.Example) -> prompts.Trajectory:
    assert ex.completion.endswith(EOT)
    return prompts.parse_trajectory(prompts.assistant_prefix() + ex.completion[: -len(EOT)])


def test_features_are_measured():
    f = dataset.features(["omg lol this is sooo good :) #yay", "cant wait lol!!", "going home now"])
    assert f.lower == 1.0 and f.emoji > 0.3 and f.repeat_punct > 0.3 and "lol" in f.slang
    assert dataset.features(["I Am Writing Properly."]).end_period == 1.0
    assert "lowercase" in dataset.plan_edits("Hello There Friend.", "hello there friend")
    assert "no final period" in dataset.plan_edits("I am tired.", "i am tired")


def test_targets_lose_what_no_rewrite_could_know():
    assert dataset.attainable("@bob so tired lol http://t.co/x", "I am tired.", ["lol ok"]) == "so tired lol"
    assert dataset.attainable("@bob: so tired", "@bob I am tired.") == "@bob: so tired"  # in the generic text
    assert dataset.attainable("@bob so tired", "I am tired.", ["@Bob hi"]) == "@bob so tired"  # in the history
    assert dataset.attainable("@bob", "I am tired.") == "@bob"  # never empty


def test_plans_name_only_words_the_prompt_shows():
    plan = dataset.plan_edits("I am very tired today.", "so tired 2day lol", ["lol ok", "wat 2day"])
    assert "use 2day, lol" in plan and "so" not in plan.split("use ")[1].split(";")[0]
    assert "drop am, very" in plan or "drop i, am, very" in plan


def test_lamp_examples_parse_and_never_contain_their_target(lamp7, store):
    rows = dataset.read_lamp(lamp7, skip=100, limit=12)
    assert len(rows) == 12
    first_ids = {r["id"] for r in dataset.read_lamp(lamp7, limit=100)}
    assert not first_ids & {r["id"] for r in rows}  # eval users never enter training
    examples = dataset.lamp_examples(rows, store, SMOLLM2_TEMPLATE)
    kept = [r for r in rows if dataset.is_rewrite(dataset.lamp_generic(r["input"]), r["output"])]
    assert 0 < len(examples) == len(kept) < len(rows)  # outputs that are not rewrites are left out
    for row, ex in zip(kept, examples, strict=True):
        assert ex.target == row["output"].strip()
        assert text.content_kept(ex.target, ex.generic) >= dataset.MIN_TARGET_KEPT
        assert digest(ex.target) not in {digest(c) for c in ex.context}
        assert ex.prompt == prompts.reflection_prompt(SMOLLM2_TEMPLATE, ex.generic, ex.context)
        traj = _parse(ex)
        assert traj.answer == dataset.attainable(ex.target, ex.generic, ex.context)
        assert traj.style and traj.diff and traj.edits
        assert len(ex.completion) - len(ex.target) < 420  # the analysis fits the trajectory budget


def test_profile_examples_exclude_the_target_even_when_it_matches(store):
    texts = ["walking the dog lol", "the dog is walking lol", "pizza w/ the crew", "so tired 2day"]
    store.add_items("ann", [{"text": t} for t in texts])
    engine = FakeEngine(responder=lambda p: "The dog is walking.")  # a paraphrase close to item 2
    targets = dataset.profile_targets(store, "ann")
    examples = dataset.profile_examples(store, "ann", engine, targets, k=4)
    for ex in examples:
        assert ex.generic == "The dog is walking."
        assert ex.target not in ex.context and len(ex.context) == 3
        assert _parse(ex).answer == ex.target


def test_train_auto_skips_without_new_material(cli, store):
    store.add_items("ann", [{"text": "just one thing"}])
    r = cli("train", "auto", "--profile", "ann", "--json")
    assert r.code == 0, r
    doc = json.loads(r.stdout)
    assert doc["status"] == "skipped" and doc["adapter"] is None and "needed" in doc["reason"]
    assert set(doc) == {"status", "adapter", "reason", "figures"}


def test_train_sft_unknown_profile(cli):
    r = cli("train", "sft", "--profile", "ghost")
    assert r.code == 5 and r.stdout == ""


@pytest.mark.model
@pytest.mark.train
def test_train_sft_end_to_end(rpo_home, lamp7):
    """A real `rpo train sft` of 2 steps: paraphrases by llama.cpp, LoRA training, GGUF export,
    held-out evaluation, registration; the adapter loads in llama.cpp."""
    from rpo_local.store import Store

    rows = dataset.read_lamp(lamp7, skip=100, limit=1)
    with Store.open() as store:
        store.add_items("ann", [{"text": p["text"], "kind": "tweet"} for p in rows[0]["profile"][:10]])
    env = {**os.environ, "RPO_HOME": str(rpo_home), "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rpo_local", "train", "sft", "--profile", "ann", "--steps", "2",
         "--batch-size", "2", "--top-layers", "2", "--from-scratch", "--json", "--progress-json"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert doc["status"] in ("activated", "rejected"), doc
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"event"')]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2] and all(e["total"] == 2 and e["loss"] > 0 for e in steps)
    assert events[-1]["event"] == "done" and events[-1]["status"] == doc["status"]
    with Store.open() as store:
        adapter = store.get_adapter(doc["adapter"])
        run = store.list_train_runs("ann")[0]
        active = store.active_adapter("ann")
    path = Path(adapter["path"])
    assert path.is_file() and adapter["base_sha256"] and adapter["eval"]["heldout_after"]["n"] >= 2
    assert run["status"] == doc["status"] and run["adapter_id"] == adapter["id"] and run["finished_at"]
    assert (active is not None and active["id"] == adapter["id"]) == (doc["status"] == "activated")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    from rpo_local.lora_runtime import verify_adapter
    from rpo_local.models import embedded_model_path

    verify_adapter(embedded_model_path(), path)


@pytest.mark.model
@pytest.mark.train
def test_the_torch_conversion_is_kept_and_loads_bit_for_bit(model_path, tmp_path, monkeypatch):
    """The first load converts the GGUF and keeps it (whole: no temporary folder left); the
    second reads the kept one and gives the same weights, tokens and chat template."""
    import torch

    from rpo_local import paths
    from rpo_local.training import sft

    monkeypatch.setenv("RPO_HOME", str(tmp_path / "fresh"))  # its own cache: the conversion runs here
    model, tok = sft.load_base(model_path)
    folder = sft._converted_dir(model_path)
    assert (folder / "model.safetensors").is_file() and [p.name for p in paths.torch_models_dir().iterdir()] == [folder.name]
    kept, kept_tok = sft.load_base(model_path)
    a, b = model.state_dict(), kept.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    turn = "<|im_start|>user\nHi wörld 😀\t 42<|im_end|>\n<|im_start|>assistant\n"
    assert tok(turn).input_ids == kept_tok(turn).input_ids and tok.chat_template == kept_tok.chat_template
