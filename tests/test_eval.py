"""`rpo eval`: LaMP loading, scoring and the evaluation harness.

Unit tests use small synthetic LaMP files and the fake engine; the end-to-end tests run the
real embedded model through llama.cpp on users of ../shared/data/lamp7/dev.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import FakeEngine, lowercasing_responder

from rpo_local import evaluate, lamp
from rpo_local.errors import InputError

TWEET_TASK = "Paraphrase the following tweet without any explanation before or after it: "
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def lamp7_user(uid: str, neutral: str, output: str, tweets: list[str]) -> dict:
    return {"id": uid, "input": TWEET_TASK + neutral, "profile": [{"text": t} for t in tweets], "output": output}


USERS = [
    lamp7_user("u1", "I Am Going To The Beach Today.", "off 2 the beach!!", ["beach day w/ the crew", "rainy again ugh"]),
    lamp7_user("u2", "My Cat Is Sleeping On My Keyboard.", "cat on keyboard lol", ["my cat is a menace", "coffee first"]),
    lamp7_user("u3", "The Concert Was Amazing.", "best concert EVER", ["concert tonight!!", "so tired"]),
]


@pytest.fixture
def jsonl(tmp_path) -> Path:
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in USERS), encoding="utf-8")
    return path


def write_two_files(tmp_path: Path, users: list[dict], task: str = "LaMP_7") -> tuple[Path, Path]:
    questions, outputs = tmp_path / "questions.json", tmp_path / "outputs.json"
    questions.write_text(json.dumps([{k: u[k] for k in ("id", "input", "profile")} for u in users], indent=2))
    golds = [{"id": u["id"], "output": u["output"]} for u in users]
    outputs.write_text(json.dumps({"task": task, "golds": golds}, indent=2))
    return questions, outputs


# -- scoring ----------------------------------------------------------------------------------

PAIRS = [
    ("the cat sat", "the cat sat on the mat"),
    ("Running dogs bark loudly", "the dog runs and barks"),  # a stemmer would match run/runs
    ("  spaces around  \n", "spaces around"),
    ("", "an empty prediction scores zero"),
    ("Totally different words", "nothing shared here"),
]


@pytest.mark.parametrize(("pred", "gold"), PAIRS)
def test_rouge_matches_rouge_score(pred, gold):
    from rouge_score import rouge_scorer

    ref = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False).score(gold.strip(), pred.strip())
    assert evaluate.rouge(pred, gold) == pytest.approx((ref["rouge1"].fmeasure, ref["rougeL"].fmeasure), abs=1e-12)


def test_rouge_known_values_and_mean():
    assert evaluate.rouge("the cat sat", "the cat sat on the mat") == pytest.approx((2 / 3, 2 / 3))
    assert evaluate.rouge("Running dogs", "the dog runs") == (0.0, 0.0)  # no stemmer
    assert evaluate.rouge("b a", "a b") == pytest.approx((1.0, 0.5))  # ROUGE-L keeps order
    r1, rl = evaluate.mean_rouge([p for p, _ in PAIRS], [g for _, g in PAIRS])
    each = [evaluate.rouge(p, g) for p, g in PAIRS]
    assert (r1, rl) == pytest.approx((sum(a for a, _ in each) / 5, sum(b for _, b in each) / 5))


def test_copy_reproduces_the_reference_baseline(lamp7):
    """The copy-input baseline on the whole shared file: ROUGE-1 0.4649 / ROUGE-L 0.4088."""
    data = lamp.load(lamp7)
    assert data.task == "LaMP_7" and len(data.users) == 1046
    report = evaluate.run_eval(data, engine=_NoModel(), methods=["copy"])
    (copy,) = report.summaries()
    assert copy.users == 1046
    assert round(copy.rouge1, 4) == 0.4649 and round(copy.rougeL, 4) == 0.4088


class _NoModel:
    model_path = Path("none")
    adapter_path = None


# -- loading ----------------------------------------------------------------------------------

def test_jsonl_layout(jsonl):
    data = lamp.load(jsonl)
    assert data.task == "LaMP_7" and [u.id for u in data.users] == ["u1", "u2", "u3"]
    assert data.users[1].output == "cat on keyboard lol"
    assert lamp.query_text("LaMP_7", data.users[0].input) == "I Am Going To The Beach Today."


def test_two_file_layout_matches_jsonl(tmp_path, jsonl):
    questions, outputs = write_two_files(tmp_path, list(reversed(USERS)))
    data = lamp.load(questions=questions, outputs=outputs)
    assert data.task == "LaMP_7" and [u.id for u in data.users] == ["u3", "u2", "u1"]
    by_id = {u.id: u for u in lamp.load(jsonl).users}
    for user in data.users:
        assert (user.input, user.profile, user.output) == (by_id[user.id].input, by_id[user.id].profile, by_id[user.id].output)
    assert lamp.load(questions, outputs=outputs).users == data.users  # questions given as DATA


@pytest.mark.parametrize(
    ("task", "profile", "query", "item"),
    [
        ("LaMP_4", [{"title": "Big News", "text": "It happened.", "id": "1"}],
         "Generate a headline for the following article: Storm hits town", "Big News It happened."),
        ("LaMP_5", [{"title": "On Graphs", "abstract": "We study graphs.", "id": "1"}],
         "Generate a title for the following abstract of a paper: We prove things", "On Graphs We study graphs."),
    ],
)
def test_tasks_4_and_5(tmp_path, task, profile, query, item):
    user = {"id": 7, "input": query, "profile": profile, "output": "gold"}
    questions, outputs = write_two_files(tmp_path, [user], task=task)
    data = lamp.load(questions=questions, outputs=outputs)
    assert data.task == task and data.users[0].id == 7  # ids keep their JSON type
    assert lamp.item_text(task, profile[0]) == item
    assert lamp.query_text(task, query) == query.split(":", 1)[1].strip()
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(user) + "\n")
    assert lamp.load(path).task == task  # detected from the profile fields
    with pytest.raises(InputError, match="--rpo-input base"):
        evaluate.run_eval(data, _NoModel(), methods=["copy"], rpo_input="input")


def test_offset_and_limit_select_deterministically(jsonl):
    users = lamp.load(jsonl).users
    assert [u.id for u in lamp.select(users, offset=1, limit=1)] == ["u2"]
    assert [u.id for u in lamp.select(users, offset=1)] == ["u2", "u3"]
    assert lamp.select(users, offset=5, limit=2) == []
    assert lamp.select(users, offset=0, limit=2) == lamp.select(users, offset=0, limit=2)


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        ('{"id": "a", "input": "x: y", "profile": [], "output": "o"}\n{"id": "b", "input": \n', 2, "invalid JSON"),
        ('{"id": "a", "input": "x: y", "profile": [], "output": "o"}\n\n{"id": "b", "profile": [], "output": "o"}\n', 3, "missing field(s) input"),
        ('{"id": "a", "input": "x: y", "profile": "tweets", "output": "o"}\n', 1, "'profile' must be a list"),
        ('{"id": "a", "input": "x: y", "profile": [{"text": ""}], "output": "o"}\n', 1, "has no text"),
        ('{"id": "a", "input": "x: y", "profile": [], "output": 3}\n', 1, "'output' must be a string"),
        ('{"id": "a", "input": "x: y", "profile": [], "output": "o"}\n{"id": "a", "input": "x: y", "profile": [], "output": "o"}\n', 2, "duplicate user id"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as exc:
        lamp.load(path)
    assert f"{path}:{line}:" in exc.value.message and message in exc.value.message


def test_malformed_two_file_layout_names_file_and_line(tmp_path):
    questions, outputs = write_two_files(tmp_path, USERS)
    good_q, good_o = questions.read_text(), outputs.read_text()

    doc = json.loads(good_q)
    del doc[2]["input"]
    questions.write_text(json.dumps(doc, indent=2))
    third = [i for i, line in enumerate(questions.read_text().splitlines(), 1) if line == "  {"][2]
    with pytest.raises(InputError, match=rf"{questions}:{third}: missing field\(s\) input"):
        lamp.load(questions=questions, outputs=outputs)

    questions.write_text(good_q.replace('"profile"', '"profile" "oops"', 1))
    with pytest.raises(InputError, match=rf"{questions}:\d+: invalid JSON"):
        lamp.load(questions=questions, outputs=outputs)

    questions.write_text(good_q)
    golds = json.loads(good_o)
    golds["golds"][1] = {"id": "u2"}
    outputs.write_text(json.dumps(golds, indent=2))
    second = [i for i, line in enumerate(outputs.read_text().splitlines(), 1) if line == "    {"][1]
    with pytest.raises(InputError, match=rf"{outputs}:{second}: each gold must be"):
        lamp.load(questions=questions, outputs=outputs)

    golds["golds"] = golds["golds"][:1]
    outputs.write_text(json.dumps(golds))
    with pytest.raises(InputError, match=rf"{questions}:\d+: question 'u2' has no gold output"):
        lamp.load(questions=questions, outputs=outputs)

    with pytest.raises(InputError, match="needs its --outputs"):
        lamp.load(questions=questions)
    with pytest.raises(InputError, match="LaMP task 'LaMP_2' is not supported"):
        lamp.normalize_task("LaMP_2")


def test_cli_rejects_malformed_data(cli, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a"}\n')
    r = cli("eval", str(path), "--methods", "copy")
    assert r.code == 3 and f"{path}:1: missing field(s)" in r.stderr and r.stdout == ""
    r = cli("eval", str(tmp_path / "missing.jsonl"))
    assert r.code == 3 and "no such file" in r.stderr
    path.write_bytes(b"\xff\xfe bad")
    assert cli("eval", str(path)).code == 3


def test_cli_rejects_bad_arguments(cli, jsonl, use_fake_engine):
    r = cli("eval", str(jsonl), "--methods", "copy,magic")
    assert r.code == 3 and "unknown method 'magic'" in r.stderr
    r = cli("eval", str(jsonl), "--methods", "rpo+adapter", "--adapter", "none")
    assert r.code == 3 and "needs an adapter" in r.stderr
    r = cli("eval", str(jsonl), "--methods", "rpo+adapter", "--adapter", "/nowhere/a.gguf")
    assert r.code == 4 and "adapter file not found" in r.stderr
    r = cli("eval", str(jsonl), "--offset", "3")
    assert r.code == 3 and "no users left" in r.stderr


# -- the harness with the fake engine ---------------------------------------------------------

@pytest.fixture
def adapter_file(tmp_path) -> Path:
    path = tmp_path / "tiny.lora.gguf"
    path.write_bytes(b"GGUF" + bytes(28))  # the fake engine only needs a file that looks like GGUF
    return path


class RecordingEngine(FakeEngine):
    """The fake engine, also recording which adapter each prompt ran with."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[tuple[str, Path | None]] = []

    def stream(self, prompt: str, **kw):
        self.runs.append((prompt, self.adapter_path))
        return super().stream(prompt, **kw)


def test_run_eval_all_methods_with_the_fake_engine(jsonl, adapter_file):
    engine = RecordingEngine()
    data = lamp.load(jsonl)
    report = evaluate.run_eval(data, engine, methods=list(evaluate.METHODS), adapter=adapter_file, k=2)
    assert report.completed == 3 and not report.partial
    u1 = report.users[0].outputs
    # copy is the neutral text; the fake reflection model lower-cases it (with and without adapter)
    assert u1["copy"].output == "I Am Going To The Beach Today."
    assert u1["rpo"].output == u1["rpo+adapter"].output == "i am going to the beach today."
    assert u1["rpo"].fallback is False and u1["rpo"].gen_tokens > 0
    assert u1["copy"].rouge1 == evaluate.rouge(u1["copy"].output, "off 2 the beach!!")[0]
    # the context prompt is LaMP's, with the user's own tweets retrieved from the throw-away store
    context = [p for p, _ in engine.runs if "are written by a person" in p]
    assert len(context) == 3 and '"beach day w/ the crew"' in context[0] and "my cat" not in context[0]
    # the adapter is on for rpo+adapter only, and off again afterwards
    reflection = [a for p, a in engine.runs if "Generic reply:" in p]
    assert {a for p, a in engine.runs if "Generic reply:" not in p} == {None}
    assert reflection.count(adapter_file) == reflection.count(None) == 6  # 2 phases x 3 users each
    assert engine.adapter_path is None
    summary = {s.method: s for s in report.summaries()}
    assert summary["rpo"].fallback_share == 0.0 and summary["copy"].fallback_share is None
    assert summary["copy"].rouge1 == pytest.approx(evaluate.mean_rouge(
        [u.outputs["copy"].output for u in report.users], [u.output for u in data.users])[0])


def test_rpo_input_base_rewrites_the_base_answer(jsonl):
    def responder(prompt: str) -> str:
        return lowercasing_responder(prompt) if "Generic reply:" in prompt else "A Base Answer.<|im_end|>"

    report = evaluate.run_eval(lamp.load(jsonl), FakeEngine(responder), methods=["copy", "rpo"], rpo_input="base")
    outs = report.users[0].outputs
    assert outs["copy"].output == "A Base Answer." and outs["rpo"].output == "a base answer."


def test_fallback_share_counts_unusable_rewrites(jsonl):
    report = evaluate.run_eval(lamp.load(jsonl), FakeEngine(lambda p: "no tags at all<|im_end|>"), methods=["copy", "rpo"])
    (copy, rpo) = report.summaries()
    assert rpo.fallback_share == 1.0 and rpo.rouge1 == copy.rouge1  # the generic text is kept


def test_ctrl_c_returns_a_partial_report(jsonl, use_fake_engine):
    def interrupt_after_one(done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(evaluate.EvalInterrupted) as exc:
        evaluate.run_eval(lamp.load(jsonl), use_fake_engine, methods=["copy", "rpo"], on_progress=interrupt_after_one)
    report = exc.value.report
    assert report.partial and report.completed == 1 and report.selected == 3
    assert report.predictions("rpo")["partial"] is True and "partial: 1 of 3" in report.markdown()


def test_cli_ctrl_c_flushes_partial_results(cli, jsonl, tmp_path, monkeypatch):
    """Ctrl-C while the second user runs: the first user's results are written, marked partial."""
    import rpo_local.engine as engine_mod

    def responder(prompt: str) -> str:
        if "My Cat" in prompt:
            raise KeyboardInterrupt
        return lowercasing_responder(prompt)

    monkeypatch.setattr(engine_mod, "open_engine", lambda *a, **k: FakeEngine(responder))
    preds = tmp_path / "preds"
    r = cli("eval", str(jsonl), "--methods", "copy,rpo", "--predictions-dir", str(preds), "--json")
    assert r.code == 130 and "interrupted" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["partial"] is True and doc["completed"] == 1 and doc["users"] == 3
    pred = json.loads((preds / "LaMP_7-rpo.json").read_text())
    assert pred["partial"] is True and [g["id"] for g in pred["golds"]] == ["u1"]


def test_cli_outputs_with_the_fake_engine(cli, jsonl, tmp_path, use_fake_engine, adapter_file):
    preds, chart = tmp_path / "preds", tmp_path / "chart.png"
    r = cli("eval", str(jsonl), "--adapter", str(adapter_file), "--predictions-dir", str(preds), "--plot", str(chart), "--json")
    assert r.code == 0, r
    doc = json.loads(r.stdout)
    assert [m["method"] for m in doc["methods"]] == list(evaluate.METHODS)  # all, with an adapter given
    assert doc["completed"] == 3 and doc["partial"] is False and doc["adapter"] == str(adapter_file)
    for method in evaluate.METHODS:
        path = Path(doc["predictions"][method])
        assert method in path.name and path.parent == preds
        pred = json.loads(path.read_text())
        assert pred["task"] == "LaMP_7" and [g["id"] for g in pred["golds"]] == ["u1", "u2", "u3"]
    assert chart.read_bytes().startswith(PNG_MAGIC)
    r = cli("eval", str(jsonl), "--methods", "copy,rpo", "-n", "2", "--offset", "1")
    lines = r.stdout.splitlines()
    assert r.code == 0 and lines[2].startswith("| method | ROUGE-1 | ROUGE-L |") and len(lines) == 6
    assert "2 users (offset 1)" in lines[0] and "eval 2/2 users" in r.stderr


# -- end to end with the real model -----------------------------------------------------------

def rpo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rpo_local", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "NO_COLOR": "1"},
    )


@pytest.mark.model
def test_e2e_eval_three_users_real_model(lamp7, tmp_path):
    preds, chart = tmp_path / "preds", tmp_path / "chart.png"
    r = rpo("eval", str(lamp7), "-n", "3", "--offset", "10", "--k", "2", "--max-tokens", "32",
            "--methods", "copy,base,context,rpo", "--predictions-dir", str(preds), "--plot", str(chart), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["completed"] == 3 and not doc["partial"] and doc["model"].endswith(".gguf")
    golds = {str(u.id): u.output for u in lamp.select(lamp.load(lamp7).users, offset=10, limit=3)}
    for summary in doc["methods"]:
        method = summary["method"]
        path = preds / f"LaMP_7-{method}.json"
        pred = json.loads(path.read_text())
        assert pred["task"] == "LaMP_7" and {g["id"] for g in pred["golds"]} == set(golds)
        assert all(isinstance(g["output"], str) and g["output"].strip() for g in pred["golds"])
        # re-scoring the written file gives the reported figures
        r1, rl = evaluate.mean_rouge([g["output"] for g in pred["golds"]], [golds[g["id"]] for g in pred["golds"]])
        assert (summary["rouge1"], summary["rougeL"]) == pytest.approx((r1, rl))
        if method != "copy":
            assert summary["latency_s"] > 0 and summary["gen_tokens"] > 0
    assert 0.0 <= doc["methods"][3]["fallback_share"] <= 1.0
    assert chart.read_bytes().startswith(PNG_MAGIC)
    assert "eval 3/3 users" in r.stderr


@pytest.mark.model
def test_real_model_runs_are_deterministic(lamp7, real_engine):
    data = lamp.load(lamp7)
    runs = [
        evaluate.run_eval(data, real_engine, methods=["base", "rpo"], offset=20, limit=1, k=2, max_tokens=24)
        for _ in range(2)
    ]
    assert [o.output for o in runs[0].users[0].outputs.values()] == [o.output for o in runs[1].users[0].outputs.values()]


# Read at import: the autouse rpo_home fixture clears RPO_* variables for each test.
TEST_ADAPTER = os.environ.get("RPO_TEST_ADAPTER")


def _real_adapter() -> Path | None:
    from rpo_local.adapters import builtin_adapter_path

    return Path(TEST_ADAPTER) if TEST_ADAPTER else builtin_adapter_path()


@pytest.mark.model
def test_rpo_adapter_with_a_real_adapter(lamp7, real_engine):
    import importlib.util

    adapter = _real_adapter()
    if importlib.util.find_spec("rpo_local.lora_runtime") is None or adapter is None:
        pytest.skip("no LoRA runtime or adapter yet (set RPO_TEST_ADAPTER to a GGUF LoRA adapter)")
    report = evaluate.run_eval(
        lamp.load(lamp7), real_engine, methods=["rpo", "rpo+adapter"], adapter=adapter, limit=2, k=2
    )
    assert report.completed == 2 and report.adapter == str(adapter)
    assert all(u.outputs["rpo+adapter"].output.strip() for u in report.users)
    assert real_engine.adapter_path is None  # switched back for whoever uses the engine next


def test_checkpoint_resumes_after_finished_users(jsonl, tmp_path):
    ckpt = tmp_path / "run.ckpt.jsonl"
    data = lamp.load(jsonl)

    def stop_at_cat(prompt: str) -> str:
        if "My Cat" in prompt:
            raise KeyboardInterrupt
        return lowercasing_responder(prompt)

    with pytest.raises(evaluate.EvalInterrupted):
        evaluate.run_eval(data, FakeEngine(stop_at_cat), methods=["copy", "rpo"], checkpoint=ckpt)
    with ckpt.open("a") as fh:
        fh.write('{"id": "u2", "gold": "cut sh')  # a line torn by a crash is dropped
    engine = FakeEngine()
    report = evaluate.run_eval(data, engine, methods=["copy", "rpo"], checkpoint=ckpt)
    assert report.resumed == 1 and report.completed == 3 and not report.partial
    assert not any("Going To The Beach" in p for p in engine.prompts)  # user 1 was not run again
    fresh = evaluate.run_eval(data, FakeEngine(), methods=["copy", "rpo"])
    assert [s.rouge1 for s in report.summaries()] == [s.rouge1 for s in fresh.summaries()]
    with pytest.raises(InputError, match="other settings \\(k\\)"):
        evaluate.run_eval(data, FakeEngine(), methods=["copy", "rpo"], checkpoint=ckpt, k=1)


def test_the_retrieval_scope_is_a_setting_of_rewrite_runs_only(jsonl, tmp_path):
    from rpo_local.config import Config

    data = lamp.load(jsonl)
    ckpt = tmp_path / "run.ckpt.jsonl"
    evaluate.run_eval(data, FakeEngine(), methods=["copy", "rpo"], checkpoint=ckpt, config=Config(retrieval_scope="piece"))
    with pytest.raises(InputError, match="other settings \\(retrieval_scope\\)"):
        evaluate.run_eval(data, FakeEngine(), methods=["copy", "rpo"], checkpoint=ckpt, config=Config())
    report = evaluate.run_eval(data, FakeEngine(), methods=["copy", "rpo"], config=Config())
    assert report.settings()["retrieval_scope"] == report.to_dict()["retrieval_scope"] == "reply"
    copy_only = evaluate.run_eval(data, FakeEngine(), methods=["copy"], config=Config())
    assert "retrieval_scope" not in copy_only.settings()  # it changes nothing there: old checkpoints match


@pytest.mark.model
def test_e2e_sigint_writes_partial_results(lamp7, tmp_path):
    """A real Ctrl-C (SIGINT) to a running `rpo eval`: exit 130, finished users written, marked partial."""
    import signal

    preds = tmp_path / "preds"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rpo_local", "eval", str(lamp7), "-n", "60", "--methods", "copy,base",
         "--max-tokens", "16", "--predictions-dir", str(preds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"},
        # A shell running the tests in the background ignores SIGINT, and children inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stderr:  # the first progress line: some users are done, most are not
        if "/60 users" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "partial" in out and "interrupted" in err
    pred = json.loads((preds / "LaMP_7-base.json").read_text())
    assert pred["partial"] is True and 1 <= len(pred["golds"]) < 60
