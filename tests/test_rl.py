"""The RL stage: reward-ranked fine-tuning (rollouts, rewards, selection) and GRPO with the
multi-context curriculum (advantages, sampled rollouts, the update on a tiny random llama).

Unit tests script the samples with the fake engine; the model-marked test samples from the real
embedded model through llama.cpp with the shipped adapter.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import SMOLLM2_TEMPLATE, FakeEngine

from rpo_local import paths, prompts
from rpo_local.config import load_config
from rpo_local.evaluate import rouge
from rpo_local.models import gguf_metadata
from rpo_local.training import dataset, rl

EOT = "<|im_end|>"  # SmolLM2's end of turn (prompts.end_of_turn of its template)

ROOT = Path(__file__).resolve().parents[1]
GENERIC = "I am feeling very tired after the long trip to Paris today."
TARGET = "so tired after paris trip today lol"


def _example() -> dataset.Example:
    return dataset.make_example(SMOLLM2_TEMPLATE, "u1", GENERIC, TARGET, ["lol ok", "paris was fun"])


def _cycling(answers: list[str]) -> FakeEngine:
    """A fake model whose successive samples answer with `answers` in turn."""
    it = itertools.cycle(answers)

    def respond(prompt: str) -> str:
        if prompt.endswith("<answer>"):
            return next(it) + "</answer>"
        return "short, lowercase</style>\n<diff>generic is longer</diff>\n<edits>shorten</edits>\n<answer>"

    return FakeEngine(responder=respond)


def test_rollouts_reward_each_sample_and_keep_the_best_that_beats_the_generic_text():
    answers = ["tired after the trip to paris today lol", "I like turtles", GENERIC]
    loose = dataclasses.replace(load_config(), min_content_kept=0.4)  # answers[0] drops "feeling", "long"
    rolls = rl.rollouts(_cycling(answers), [_example()], loose, n=3)
    (roll,) = rolls
    assert roll.baseline == pytest.approx(rouge(GENERIC, TARGET)[0])
    assert [s.answer for s in roll.samples] == [answers[0], GENERIC, GENERIC]
    assert [s.fallback for s in roll.samples] == [False, True, False]  # "I like turtles" drops the content
    assert [s.reward for s in roll.samples] == pytest.approx([rouge(s.answer, TARGET)[0] for s in roll.samples])
    assert roll.best.answer == answers[0] and roll.advantage() > 0.05

    (kept,) = rl.select(rolls, margin=0.05)
    assert kept.prompt == _example().prompt and kept.target == TARGET
    traj = prompts.parse_trajectory(prompts.assistant_prefix() + kept.completion.removesuffix(EOT))
    assert traj.answer == answers[0] and traj.edits == "shorten"
    figures = rl.summary(rolls, [kept])
    assert figures["kept"] == 1 and figures["samples"] == 3 and figures["best_reward"] > figures["baseline_reward"]


def test_nothing_is_learned_where_no_sample_beats_the_generic_text():
    rolls = rl.rollouts(_cycling(["I like turtles", GENERIC.lower()]), [_example()], load_config(), n=2)
    assert rl.select(rolls, margin=0.05) == []
    assert rl.select(rolls, margin=-1.0) != []  # the lower-cased copy is usable, just not better


def test_samples_use_the_sampling_temperature_and_distinct_seeds():
    seen = []

    class Recording(FakeEngine):
        def stream(self, prompt, **kw):
            seen.append((kw["temperature"], kw["seed"]))
            return super().stream(prompt, **kw)

    rl.rollouts(Recording(), [_example()], load_config(), n=3, temperature=0.7)
    assert {t for t, _ in seen} == {0.7} and len({s for _, s in seen}) == 3


# -- rollouts batched in torch (the GPU path) ------------------------------------------------

KEEPS = "so tired after the long trip to paris today lol"  # keeps the generic text's content
RAWS = [
    f"short</style>\n<diff>generic is longer</diff>\n<edits>shorten</edits>\n<answer>{KEEPS}</answer>",
    "short</style>\n<diff>x</diff>\n<edits>y</edits>\n<answer>I like turtles</answer>",  # drops the content
    "short</style> and never answers",
]


def _fake_generate(monkeypatch, calls: list | None = None, pause: float = 0.0) -> None:
    """torch generation replaced: sample i of every prompt is RAWS[i]."""
    from rpo_local.training import generate

    def fake(model, tok, texts, eot, *, n=1, **kw):
        if calls is not None:
            calls.append(len(texts))
        time.sleep(pause)
        return [[RAWS[i % len(RAWS)] for i in range(n)] for _ in texts]

    monkeypatch.setattr(generate, "generate", fake)


def test_torch_rollouts_gate_and_reward_each_sample_like_the_runtime(monkeypatch):
    _fake_generate(monkeypatch)
    ex = _example()
    (roll,) = rl.torch_rollouts(None, None, template=SMOLLM2_TEMPLATE, examples=[ex], n=3, min_kept=0.5)
    assert roll.baseline == pytest.approx(rouge(GENERIC, TARGET)[0])
    good, dropped, unparsed = roll.samples
    assert not good.fallback and good.answer == KEEPS and good.reward == pytest.approx(rouge(KEEPS, TARGET)[0])
    traj = prompts.parse_trajectory(prompts.assistant_prefix() + good.completion.removesuffix(EOT))
    assert traj.answer == KEEPS and traj.edits == "shorten"
    # what the gate refuses, or what has no answer, is the generic text, as `rpo rewrite` prints it
    for s in (dropped, unparsed):
        assert s.fallback and s.answer == GENERIC and s.reward == roll.baseline
    assert rl.select([roll], 0.05) == [dataclasses.replace(ex, completion=good.completion)]


def test_torch_rollouts_sample_in_chunks_until_the_deadline(monkeypatch):
    calls: list[int] = []
    _fake_generate(monkeypatch, calls)
    rolls = rl.torch_rollouts(None, None, template=SMOLLM2_TEMPLATE, examples=[_example()] * 5, n=2, chunk=2)
    assert calls == [2, 2, 1] and len(rolls) == 5 and all(len(r.samples) == 2 for r in rolls)

    calls.clear()
    assert rl.torch_rollouts(None, None, template=SMOLLM2_TEMPLATE, examples=[_example()] * 5, chunk=2, deadline=time.monotonic() - 1) == []
    _fake_generate(monkeypatch, calls, pause=0.2)  # the deadline passes during the first chunk
    rolls = rl.torch_rollouts(None, None, template=SMOLLM2_TEMPLATE, examples=[_example()] * 5, chunk=2, deadline=time.monotonic() + 0.1)
    assert calls == [2] and len(rolls) == 2


@pytest.mark.model
@pytest.mark.train
def test_real_torch_rollouts_from_the_shipped_adapter(lamp7, store, model_path):
    """The GPU path on the CPU: the base model in torch with the shipped GGUF adapter loaded
    samples parseable trajectories in one batch, each rewarded against the user's tweet."""
    from rpo_local.adapters import builtin_adapter_path
    from rpo_local.training import sft

    rows = dataset.read_lamp(lamp7, skip=100, limit=6)
    examples = dataset.lamp_examples(rows, store, dataset.gguf_chat_template(model_path), min_kept=0.0)[:2]
    model, tok = sft.load_base(model_path)
    model, _ = sft.with_lora(model, sft.SFTConfig(init_adapter=str(builtin_adapter_path())))
    rolls = rl.torch_rollouts(model, tok, examples, dataset.gguf_chat_template(model_path), n=3, temperature=1.0, min_kept=0.0, max_new_tokens=160,
                              progress=False)
    answers = set()
    for roll, ex in zip(rolls, examples, strict=True):
        assert roll.baseline == pytest.approx(rouge(ex.generic, ex.target)[0]) and len(roll.samples) == 3
        for s in roll.samples:
            assert s.reward == pytest.approx(rouge(s.answer, ex.target)[0])
            if not s.fallback:
                traj = prompts.parse_trajectory(prompts.assistant_prefix() + s.completion.removesuffix(EOT))
                assert traj.answer == s.answer and traj.style
                answers.add(s.answer)
    assert len(answers) > 2, "sampling at temperature 1 gave (almost) identical or no rewrites"


@pytest.mark.model
@pytest.mark.train
def test_rl_general_adapter_script_with_torch_rollouts(tmp_path, lamp7, rpo_home):
    """train/rl_general_adapter.py --engine torch, tiny: held-out validation before and after,
    one round of rollouts, training on the kept ones, an adapter llama.cpp loads."""
    from rpo_local.lora_runtime import verify_adapter
    from rpo_local.models import embedded_model_path

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train/rl_general_adapter.py", "--engine", "torch", "--lamp", str(lamp7),
         "--init-adapter", "rpo_local/assets/reflect-lamp7.lora.gguf", "--examples", "3", "--val", "1",
         "--samples", "2", "--temperature", "1.0", "--margin=-1", "--epochs", "1", "--top-layers", "2",
         "--run-dir", str(run), "--out", str(tmp_path / "out.gguf")],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    val, lamp = dataset.read_jsonl(run / "val.jsonl"), dataset.read_jsonl(run / "lamp.jsonl")
    assert len(val) == 1 and val[0].user not in {ex.user for ex in lamp}  # held out of the rollouts
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_before"]["n"] == 1 and 0 <= summary["val_before"]["rpo"] <= 1
    (round1,) = summary["rounds"]
    assert round1["rollouts"]["samples"] == 2 * len(lamp) and round1["val"]["n"] == 1
    kept = dataset.read_jsonl(run / "kept1.jsonl")
    assert round1["rollouts"]["kept"] == len(kept) == round1["train"]["examples"] >= 1
    assert (tmp_path / "out.gguf").read_bytes() == (run / "round1.gguf").read_bytes()
    verify_adapter(embedded_model_path(), run / "round1.gguf")
    assert gguf_metadata(run / "round1.gguf")["rpo.trajectory"] == "full"  # the init adapter's


@pytest.mark.model
def test_real_rollouts_sample_parseable_trajectories_from_the_shipped_adapter(lamp7, store, model_path):
    from rpo_local.adapters import builtin_adapter_path
    from rpo_local.engine import LlamaEngine

    rows = dataset.read_lamp(lamp7, skip=100, limit=6)
    examples = dataset.lamp_examples(rows, store, dataset.gguf_chat_template(model_path), min_kept=0.0)[:2]
    engine = LlamaEngine(model_path, n_ctx=2048, adapter_path=builtin_adapter_path())
    rolls = rl.rollouts(engine, examples, load_config(), n=3, temperature=1.0)
    answers = set()
    for roll, ex in zip(rolls, examples, strict=True):
        assert roll.baseline == pytest.approx(rouge(ex.generic, ex.target)[0])
        for s in roll.samples:
            assert s.reward == pytest.approx(rouge(s.answer, ex.target)[0])
            traj = prompts.parse_trajectory(prompts.assistant_prefix() + s.completion.removesuffix(EOT))
            assert traj.answer == s.answer
            answers.add(s.answer)
    assert len(answers) > 2, "sampling at temperature 1 gave (almost) identical rewrites"


def test_train_rl_learns_nothing_when_no_rollout_beats_the_generic_text(cli, store, lamp7, monkeypatch):
    import rpo_local.engine as engine_mod

    engine = _cycling(["I like turtles"])  # every sample drops the reply's content
    monkeypatch.setattr(engine_mod, "open_engine", lambda *a, **kw: engine)
    r = cli("train", "rl", "--profile", "ann", "--lamp", str(lamp7), "--lamp-users", "12", "--json")
    assert r.code == 0, r
    doc = json.loads(r.stdout)
    assert doc["status"] == "rejected" and doc["adapter"] is None and "nothing to learn" in doc["reason"]
    rolls = doc["figures"]["rollouts"]
    assert rolls["kept"] == 0 and rolls["fallback_share"] == 1.0 and rolls["samples"] == 4 * rolls["examples"]
    (run,) = store.list_train_runs("ann")
    assert (run["kind"], run["status"]) == ("rl", "rejected")
    assert store.active_adapter("ann") is None


@pytest.mark.model
@pytest.mark.train
def test_train_rl_end_to_end(rpo_home, lamp7):
    """A real `rpo train rl`: rollouts from the shipped adapter in llama.cpp, rewards, 2 steps of
    LoRA training on the kept rollouts, export, held-out evaluation, registration."""
    from rpo_local.lora_runtime import verify_adapter
    from rpo_local.models import embedded_model_path
    from rpo_local.store import Store

    env = {**os.environ, "RPO_HOME": str(rpo_home), "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rpo_local", "train", "rl", "--profile", "ann", "--lamp", str(lamp7),
         "--lamp-users", "12", "--samples", "2", "--temperature", "1.0", "--margin=-1", "--steps", "2",
         "--json"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    rolls = doc["figures"]["rollouts"]
    assert rolls["samples"] == 2 * rolls["examples"] and rolls["kept"] >= 1, doc
    assert doc["status"] in ("activated", "rejected"), doc
    with Store.open() as store:
        adapter = store.get_adapter(doc["adapter"])
        (run,) = store.list_train_runs("ann")
        kept = dataset.read_jsonl(paths.runs_dir() / "ann-lamp-rl" / "train.jsonl")
    assert (run["kind"], run["status"], run["adapter_id"]) == ("rl", doc["status"], adapter["id"])
    assert adapter["train_summary"]["examples"] == rolls["kept"] == len(kept)
    for ex in kept:  # the model's own trajectories, in the format the parser reads
        traj = prompts.parse_trajectory(prompts.assistant_prefix() + ex.completion.removesuffix(EOT))
        assert traj.answer and traj.style is not None
    verify_adapter(embedded_model_path(), Path(adapter["path"]))


# -- GRPO with the multi-context curriculum -----------------------------------------------------

def test_group_advantages_are_rewards_against_their_group_in_standard_deviations():
    advs = rl.group_advantages([0.2, 0.4, 0.6, 0.4])
    assert sum(advs) == pytest.approx(0.0) and sum(a * a for a in advs) / 4 == pytest.approx(1.0)
    assert advs[0] < advs[1] == advs[3] < advs[2]
    assert rl.group_advantages([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]  # nothing to prefer


def test_a_curriculum_stage_prompts_with_the_first_k_retrieved_items():
    ex = dataset.make_example(SMOLLM2_TEMPLATE, "u1", GENERIC, TARGET, ["one lol", "two omg", "three haha"])
    stage = rl.with_context(ex, 2, SMOLLM2_TEMPLATE)
    assert stage.context == ["one lol", "two omg"]
    assert stage.prompt == prompts.reflection_prompt(SMOLLM2_TEMPLATE, GENERIC, ["one lol", "two omg"])
    assert "two omg" in stage.prompt and "three haha" not in stage.prompt
    assert (stage.generic, stage.target) == (ex.generic, ex.target)


def test_sampled_rollouts_keep_exactly_what_was_sampled_and_reward_what_rewrite_prints():
    it = itertools.cycle(RAWS)
    seeds = []

    class Recording(FakeEngine):
        def stream(self, prompt, **kw):
            seeds.append(kw["seed"])
            return super().stream(prompt, **kw)

    engine = Recording(responder=lambda prompt: next(it) + EOT + " trailing")
    rolls = rl.sampled_rollouts(engine, [_example(), _example()], SMOLLM2_TEMPLATE, n=3, min_kept=0.5, seed=7)
    assert len(set(seeds)) == 6 and engine.prompts == [_example().prompt] * 6
    good, dropped, unparsed = rolls[0].samples
    # the completion is the sampled text itself, gated or not: its probability is what GRPO moves
    assert [s.completion for s in rolls[0].samples] == [raw + EOT for raw in RAWS]
    assert not good.fallback and good.reward == pytest.approx(rouge(KEEPS, TARGET)[0])
    for s in (dropped, unparsed):
        assert s.fallback and s.answer == GENERIC and s.reward == rolls[0].baseline


def test_a_sample_cut_at_the_token_limit_has_no_end_of_turn():
    engine = FakeEngine(responder=lambda prompt: "short</style> and on and on " * 50)
    (roll,) = rl.sampled_rollouts(engine, [_example()], SMOLLM2_TEMPLATE, n=1, max_tokens=10)
    (sample,) = roll.samples
    assert sample.fallback and not sample.completion.endswith(EOT) and len(sample.completion) == 30


class _CharTokenizer:
    """Characters as token ids: enough for the loss code, which needs ids and a pad id only."""
    pad_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return type("Encoded", (), {"input_ids": [1 + ord(c) % 60 for c in text]})()


def _tiny_policy():
    """A randomly initialised two-block llama with a LoRA: no download, a CPU step in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rpo_local.training import sft

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    model = sft.add_lora(model, sft.SFTConfig(rank=4, dropout=0.0))
    for name, param in model.named_parameters():  # B = 0 would make the policy ignore A's gradient at first
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def _seq_logp(model, tok, ex):
    import torch

    from rpo_local.training import sft

    rows, _ = sft.encode(tok, [ex], 512)
    with torch.no_grad():
        return float(sft.completion_logprobs(model, sft.collate(rows, [0], 0))[0].sum())


@pytest.mark.train
def test_completion_log_probabilities_sum_to_the_language_model_loss_on_the_completion():
    import torch

    from rpo_local.training import sft

    model, tok = _tiny_policy(), _CharTokenizer()
    examples = [dataclasses.replace(_example(), prompt="rewrite: hi", completion=c) for c in ("ok lol", "sure thing!")]
    rows, _ = sft.encode(tok, examples, 512)
    batch = sft.collate(rows, [0, 1], 0)
    with torch.no_grad():
        logp, row = sft.completion_logprobs(model, batch)
        mean_nll = model(**batch).loss  # transformers' own shifted cross-entropy over the labels
        loss = sft.completion_loss(model, batch)
    assert row.tolist() == [0] * len("ok lol") + [1] * len("sure thing!")
    assert float(loss) == pytest.approx(float(mean_nll) * len(row), rel=1e-5)
    assert float(-logp.sum()) == pytest.approx(float(loss))


@pytest.mark.train
def test_a_grpo_update_makes_the_better_sample_likelier_and_keeps_the_reference():
    from rpo_local.training import sft

    model, tok = _tiny_policy(), _CharTokenizer()
    ex = dataclasses.replace(_example(), prompt="rewrite: hello there")
    good, bad = rl.Sample("hi there lol", "hi there lol", 0.9, False), rl.Sample("zzzz", GENERIC, 0.1, True)
    roll = rl.Rollout(ex, 0.5, [good, bad])
    as_ex = [dataclasses.replace(ex, completion=s.completion) for s in (good, bad)]
    before = [_seq_logp(model, tok, e) for e in as_ex]
    ref = sft.trainable_state(model)
    cfg = rl.GRPOConfig(lr=1e-2, beta=0.04)
    figures = rl.grpo_update(model, tok, [roll], ref, rl.grpo_optimizer(model, cfg), cfg)
    after = [_seq_logp(model, tok, e) for e in as_ex]
    assert figures["samples"] == 2 and figures["steps"] == 1
    assert figures["kl"] == pytest.approx(0.0, abs=1e-6)  # one step: the policy was still the reference
    assert after[0] - after[1] > before[0] - before[1] + 0.1
    now = sft.trainable_state(model)
    assert any(not (now[n] == ref[n]).all() for n in ref)  # the policy moved; the reference did not
    with rl.lora_weights(model, ref):
        assert [_seq_logp(model, tok, e) for e in as_ex] == pytest.approx(before)
    assert [_seq_logp(model, tok, e) for e in as_ex] == pytest.approx(after)


@pytest.mark.train
def test_a_group_whose_samples_score_the_same_teaches_nothing():
    from rpo_local.training import sft

    model, tok = _tiny_policy(), _CharTokenizer()
    roll = rl.Rollout(_example(), 0.5, [rl.Sample("a", "a", 0.5, False), rl.Sample("b", GENERIC, 0.5, True)])
    ref = sft.trainable_state(model)
    cfg = rl.GRPOConfig(lr=1e-2)
    figures = rl.grpo_update(model, tok, [roll], ref, rl.grpo_optimizer(model, cfg), cfg)
    assert figures["samples"] == 0 and figures["steps"] == 0
    assert all((sft.trainable_state(model)[n] == ref[n]).all() for n in ref)


@pytest.mark.model
@pytest.mark.train
def test_rl_general_adapter_script_with_grpo_and_the_curriculum(tmp_path, lamp7, rpo_home):
    """train/rl_general_adapter.py --method grpo, tiny: one round per curriculum stage, rollouts
    in llama.cpp with that stage's number of retrieved items, an adapter llama.cpp loads. It
    starts from the answer-only adapter: prompts, samples and the adapters written keep that
    format (a run once prompted an answer-only adapter for the full trajectory)."""
    from rpo_local.lora_runtime import verify_adapter
    from rpo_local.models import embedded_model_path

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train/rl_general_adapter.py", "--method", "grpo", "--curriculum", "1,2",
         "--lamp", str(lamp7), "--init-adapter", "rpo_local/assets/reflect-lamp7-answer.lora.gguf",
         "--examples", "2", "--samples", "3", "--temperature", "1.0", "--top-layers", "2", "--lr", "1e-4",
         "--run-dir", str(run), "--out", str(tmp_path / "out.gguf")],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "grpo" and [r["k"] for r in summary["rounds"]] == [1, 2]
    lamp = dataset.read_jsonl(run / "lamp.jsonl")
    for r, k in ((1, 1), (2, 2)):
        rolls = [json.loads(line) for line in (run / f"rollouts{r}.jsonl").read_text().splitlines()]
        assert len(rolls) == len(lamp) and all(len(x["samples"]) == 3 for x in rolls)
        assert all(x["example"]["context"] == ex.context[:k] for x, ex in zip(rolls, lamp, strict=True))
        assert all(x["example"]["prompt"].endswith(prompts.ANSWER_OPEN) for x in rolls)
        assert not any("<style>" in smp["completion"] for x in rolls for smp in x["samples"])
        figures = summary["rounds"][r - 1]
        assert figures["rollouts"]["samples"] == 3 * len(lamp) and figures["train"]["samples"] <= 3 * len(lamp)
    assert (tmp_path / "out.gguf").read_bytes() == (run / "round2.gguf").read_bytes()
    verify_adapter(embedded_model_path(), run / "round2.gguf")
    assert all(ex.fmt == "answer" for ex in lamp)
    assert gguf_metadata(run / "round2.gguf")["rpo.trajectory"] == "answer"
