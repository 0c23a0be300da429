"""CLI discipline with the fake engine: stdout holds only the result, stderr the rest, and
each kind of bad input has its own exit code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


@pytest.fixture
def ann(cli):
    r = cli("history", "add", "--profile", "ann", "--kind", "tweet", "walking the dog lol", "pizza w/ the crew")
    assert r.code == 0, r
    return cli


def test_rewrite_stdout_is_only_the_rewrite(ann, use_fake_engine):
    r = ann("rewrite", "--profile", "ann", stdin=b"The Dog Needs A Walk.\n")
    assert r.code == 0 and r.stdout == "the dog needs a walk.\n"
    r = ann("rewrite", "--profile", "ann", "-t", "--no-stream", stdin=b"See You At The Park.")
    assert r.stdout == "see you at the park.\n" and "style: writes in lowercase" in r.stderr


def test_rewrite_json(ann, use_fake_engine):
    r = ann("rewrite", "--profile", "ann", "--json", stdin=b"See You At The Park.")
    doc = json.loads(r.stdout)
    assert doc["rewrite"] == "see you at the park." and doc["interaction_id"] == 1 and doc["fallback"] is False
    assert {"trajectory", "retrieved", "prompt_s", "gen_s", "total_s", "prompt_tokens"} <= set(doc)


def test_rewrite_to_file_is_atomic(ann, use_fake_engine, tmp_path):
    out = tmp_path / "outdir" / "out.txt"
    out.parent.mkdir()
    out.write_text("previous")
    r = ann("rewrite", "--profile", "ann", "-o", str(out), stdin=b"See You At The Park.")
    assert r.code == 0 and r.stdout == "" and out.read_text() == "see you at the park.\n"
    assert [p.name for p in out.parent.iterdir()] == ["out.txt"]  # no temporary left behind


def test_rewrite_file_argument_and_no_log(ann, use_fake_engine, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("From A File.")
    r = ann("rewrite", str(src), "--profile", "ann", "--no-log")
    assert r.stdout == "from a file.\n"
    assert json.loads(ann("log", "--profile", "ann", "--json").stdout) == []


@pytest.mark.parametrize(
    ("stdin", "code", "message"),
    [
        (b"", 3, "input is empty"),
        (b"  \n\t ", 3, "input is empty"),
        (b"caf\xe9 au lait", 3, "not valid UTF-8"),
        (b"\x00\x01\x02binary", 3, "binary data"),
        (b"\x01\x02\x1b\n", 3, "control character U+0001"),
    ],
)
def test_bad_input(ann, use_fake_engine, stdin, code, message):
    r = ann("rewrite", "--profile", "ann", stdin=stdin)
    assert r.code == code and message in r.stderr and r.stdout == ""
    assert use_fake_engine.prompts == []


def test_tty_stdin_is_a_usage_error_not_a_hang(ann, use_fake_engine):
    r = ann("rewrite", "--profile", "ann", tty=True)
    assert r.code == 2 and "no input" in r.stderr and r.stdout == ""


def test_unknown_profile(ann, use_fake_engine):
    r = ann("rewrite", "--profile", "ghost", stdin=b"Hi.")
    assert r.code == 5 and "unknown profile 'ghost'" in r.stderr


def test_missing_model(ann):
    r = ann("rewrite", "--profile", "ann", "--model", "/nonexistent/model.gguf", stdin=b"Hi.")
    assert r.code == 4 and "model file not found" in r.stderr


def test_newer_database_schema(ann, rpo_home):
    import sqlite3

    conn = sqlite3.connect(rpo_home / "data" / "rpo.db")
    conn.execute("insert into _rpo_migrations values ('9999_future', 'now')")
    conn.commit()
    r = ann("history", "list", "--profile", "ann")
    assert r.code == 6 and "newer rpo-local" in r.stderr


def test_history_verbs(ann, tmp_path):
    r = ann("history", "list", "--profile", "ann", "--json")
    rows = json.loads(r.stdout)
    assert sorted(x["text"] for x in rows) == ["pizza w/ the crew", "walking the dog lol"]
    r = ann("history", "search", "dog", "--profile", "ann")
    assert r.stdout.count("\n") == 1 and "walking the dog lol" in r.stdout
    item = rows[0]["id"]
    assert json.loads(ann("history", "show", str(item), "--json").stdout)["id"] == item
    assert ann("history", "forget", str(item)).code == 0
    assert ann("history", "show", str(item)).code == 8
    assert ann("history", "forget", "12345").code == 8


def test_history_add_from_stdin_and_file(cli, tmp_path):
    r = cli("history", "add", stdin="a note from stdin ✓".encode())
    assert r.code == 0 and r.stdout.strip() == "1" and "added 1 item" in r.stderr
    f = tmp_path / "mail.txt"
    f.write_text("Dear team,\nthanks!")
    assert cli("history", "add", "-f", str(f), "--kind", "email").stdout.strip() == "2"
    assert cli("history", "add", "--kind", "spaceship", "x").code == 3


def test_history_import_formats(cli, tmp_path):
    md = tmp_path / "notes.md"
    md.write_text("first para\n\nsecond para\n\n\nthird")
    jl = tmp_path / "items.jsonl"
    jl.write_text('{"text": "from jsonl", "kind": "email"}\n\n{"content": "also content"}\n')
    import sqlite3

    logs = tmp_path / "logs.db"
    conn = sqlite3.connect(logs)
    conn.execute("create table responses (id text, model text, prompt text, response text, datetime_utc text)")
    conn.execute("insert into responses values ('1', 'gpt-4o', 'explain monads like im 5 pls', 'ok', '2024-01-01')")
    conn.execute("insert into responses values ('2', 'gpt-4o', '', 'x', '2024-01-02')")
    conn.commit()
    conn.close()
    r = cli("history", "import", str(md), str(jl), str(logs), "--json")
    assert r.code == 0 and len(json.loads(r.stdout)["added"]) == 6
    texts = {x["text"]: x["kind"] for x in json.loads(cli("history", "list", "--json").stdout)}
    assert texts["explain monads like im 5 pls"] == "chat" and texts["from jsonl"] == "email" and "third" in texts
    # A re-import adds nothing.
    assert json.loads(cli("history", "import", str(md), "--json").stdout)["skipped"] == 3


def test_history_import_malformed_jsonl_names_file_and_line(cli, tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "fine"}\n{not json}\n')
    r = cli("history", "import", str(jl))
    assert r.code == 3 and f"{jl}:2" in r.stderr and "nothing was imported" in r.stderr and r.stdout == ""
    assert cli("profiles", "list", "--json").stdout.strip() == "[]"  # nothing half-imported
    good = tmp_path / "good.md"
    good.write_text("a fine paragraph")
    bad_kind = tmp_path / "kind.jsonl"
    bad_kind.write_text('{"text": "x", "kind": "spaceship"}\n')
    for paths in ([good, jl], [good, bad_kind]):  # a bad file after a good one: still nothing
        r = cli("history", "import", *map(str, paths))
        assert r.code == 3 and "nothing was imported" in r.stderr, r
    assert cli("profiles", "list", "--json").stdout.strip() == "[]"


def test_history_import_of_a_directory_or_an_empty_file_says_why(cli, tmp_path):
    r = cli("history", "import", str(tmp_path))
    assert r.code == 3 and "is a directory" in r.stderr and "no such file" not in r.stderr, r
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    r = cli("history", "import", str(empty), "--json")
    assert r.code == 0 and json.loads(r.stdout)["added"] == [], r
    assert f"{empty}: no text in it" in r.stderr and "nothing to import" in r.stderr


def test_feedback_and_log(ann, use_fake_engine):
    ann("rewrite", "--profile", "ann", stdin=b"Good Morning.")
    log = json.loads(ann("log", "--profile", "ann", "--json").stdout)
    assert log[0]["rewrite"] == "good morning."
    assert ann("feedback", str(log[0]["id"]), "edited", "--text", "gm fam").code == 0
    assert ann("feedback", str(log[0]["id"]), "meh").code == 3
    assert "gm fam" in ann("history", "list", "--profile", "ann").stdout


def test_paths_and_config(cli, rpo_home):
    paths = json.loads(cli("paths", "--json").stdout)
    assert paths["database"] == str(rpo_home / "data" / "rpo.db")
    assert cli("config", "set", "k", "7").code == 0
    assert json.loads(cli("config", "show", "--json").stdout)["k"] == 7
    assert cli("config", "set", "k", "seven").code == 9
    assert cli("config", "set", "nope", "1").code == 9
    assert json.loads(cli("config", "show", "--json").stdout)["retrieval_scope"] == "reply"
    bad = cli("config", "set", "retrieval_scope", "sentence")
    assert bad.code == 9 and "must be one of piece, reply" in bad.stderr
    assert cli("config", "set", "retrieval_scope", "piece").code == 0
    assert json.loads(cli("config", "show", "--json").stdout)["retrieval_scope"] == "piece"


def test_a_share_outside_0_to_1_is_refused_and_the_file_kept(cli, rpo_home, monkeypatch):
    assert cli("config", "set", "min_content_kept", "0.6").code == 0
    r = cli("config", "set", "min_content_kept", "40")  # a percentage by mistake
    assert r.code == 9 and "between 0.0 and 1.0" in r.stderr and r.stdout == ""
    assert json.loads(cli("config", "show", "--json").stdout)["min_content_kept"] == 0.6
    monkeypatch.setenv("RPO_MIN_CONTENT_KEPT", "-1")
    assert cli("config", "show", "--json").code == 9


def test_gate_and_piece_words_follow_the_adapter_unless_configured(cli, rpo_home, monkeypatch):
    from rpo_local import adapters
    from rpo_local.config import Config, load_config

    shipped = adapters.asset_path(adapters.BUILTINS["builtin-lamp7-answer"][0])
    monkeypatch.setitem(adapters.BUILTIN_SETTINGS, "builtin-lamp7-answer", {"min_content_kept": 0.1, "piece_words": 60})
    auto = load_config()
    assert auto.min_content_kept is None and auto.piece_words is None  # "auto" by default
    assert adapters.setting(auto, "min_content_kept", shipped) == 0.1
    assert adapters.setting(auto, "piece_words", shipped) == 60
    assert adapters.setting(auto, "min_content_kept", "elsewhere/mine.lora.gguf") == 0.8  # the defaults
    assert adapters.setting(auto, "piece_words", None) == 0
    assert adapters.setting(Config(min_content_kept=0.5), "min_content_kept", shipped) == 0.5  # configured wins
    assert cli("config", "set", "piece_words", "30").code == 0 and load_config().piece_words == 30
    assert cli("config", "set", "piece_words", "auto").code == 0 and load_config().piece_words is None
    monkeypatch.setenv("RPO_MIN_CONTENT_KEPT", "auto")
    assert load_config().min_content_kept is None
    # the same file named relative to the working directory (as the train scripts take it)
    monkeypatch.chdir(shipped.parent.parent)
    assert adapters.setting(auto, "min_content_kept", Path(shipped.parent.name) / shipped.name) == 0.1


def test_max_queued_requests_is_a_checked_setting(cli, rpo_home, monkeypatch):
    assert json.loads(cli("config", "show", "--json").stdout)["max_queued_requests"] == 32
    r = cli("config", "set", "max_queued_requests", "0")  # would refuse every request
    assert r.code == 9 and "between 1 and 100000" in r.stderr
    assert cli("config", "set", "max_queued_requests", "4").code == 0
    assert json.loads(cli("config", "show", "--json").stdout)["max_queued_requests"] == 4


def test_reads_never_create_a_profile(cli, store, tmp_path):
    """`doctor -p typo` reports the profile as not there (and is not a failure), and listing
    adapters works on a fresh install: adapters are not per profile."""
    r = cli("doctor", "-p", "typo", "--json")
    assert r.code == 0, r
    doc = json.loads(r.stdout)
    assert doc["profile_exists"] is False and doc["problems"] == [] and doc["auto_training"] is None
    assert "not created" in cli("doctor", "-p", "typo").stdout
    r = cli("adapters", "list", "--json")
    assert r.code == 0, r
    doc = json.loads(r.stdout)
    assert doc["profile"] == "default" and doc["active"] == "builtin-lamp7"
    assert [e["name"] for e in doc["adapters"] if e["active"]] == ["builtin-lamp7"]
    store.register_adapter("general", tmp_path / "general.lora.gguf")
    store.register_adapter("bobs", tmp_path / "bobs.lora.gguf", profile="bob")
    names = [e["name"] for e in json.loads(cli("adapters", "list", "-p", "typo", "--json").stdout)["adapters"]]
    assert names == ["builtin-lamp7", "builtin-lamp7-answer", "general"], "general adapters, not another profile's"
    assert cli("train", "runs", "-p", "typo").code == 5 and cli("log", "-p", "typo").code == 5
    assert [p["name"] for p in store.list_profiles()] == ["bob"]


@pytest.mark.parametrize(("args", "module", "extra"), [
    (("eval", "--methods", "copy"), "rouge_score", "eval"),
    (("eval", "--methods", "copy", "--plot", "x.png"), "matplotlib", "eval"),
    (("train", "sft", "--profile", "ann"), "torch", "train"),
    (("train", "auto", "--profile", "ann", "--json"), "peft", "train"),
    (("train", "rl", "--profile", "ann"), "filelock", "train"),
    (("history", "embed", "--profile", "ann"), "onnxruntime", "retrieval"),
    (("history", "embed", "--profile", "ann"), "optimum", "retrieval-export"),  # the model not exported yet
])
def test_a_missing_extra_is_named_with_its_own_exit_code(ann, monkeypatch, tmp_path, args, module, extra):
    """The runtime-only install (no [eval], no [train]): a clear message, exit 12, no traceback."""
    data = tmp_path / "dev.jsonl"  # a valid LaMP-7 file: without the check, `copy` would run
    task = "Paraphrase the following tweet without any explanation before or after it: "
    data.write_text(json.dumps({"id": "u1", "input": task + "A Day At The Beach.", "output": "beach day!!",
                                "profile": [{"text": "rainy again ugh"}]}) + "\n")
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: `import` fails, find_spec finds none
    r = ann(*args[:1], *([str(data)] if args[0] == "eval" else []), *args[1:])
    assert r.code == 12 and r.stdout == "", r
    assert f"pip install 'rpo-local[{extra}]'" in r.stderr and module in r.stderr and "Traceback" not in r.stderr
