"""Profile names: one rule for which are valid, and no name, valid or not, can make a file appear
outside RPO_HOME (the real training pipeline and scheduler build the paths)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from fakes import FakeEngine

from rpo_local import names, paths
from rpo_local.db import now
from rpo_local.errors import ConfigError, InputError

ESCAPE = "../../../escape"
VALID = ["default", "ann", "Ann", "Zoë", "Zoe\u0301", "user_1", "a.b-c", "名前", "7100", "x" * 64]
INVALID = ["", " ", "ann ", " ann", ESCAPE, "a/b", "a\\b", "..", "a..b", ".hidden", "-flag", "_x",
           "a\nb", "a\rb", "a\x00b", "a\tb", "a b", "a:b", "a%2Fb", "\u0301a", "a\u202eb", "a\u200db", "x" * 65]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def legacy_profile(store, name: str) -> None:
    """A profile as a database written before names were checked can hold it."""
    store.db["profiles"].insert({"name": name, "created_at": now()})


@pytest.mark.parametrize("name", VALID)
def test_valid_names(name):
    assert names.problem(name) is None and names.check_profile(name) == name


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names_are_refused_everywhere_a_profile_is_created(name, store):
    assert names.problem(name)
    with pytest.raises(InputError, match="invalid profile name"):
        store.ensure_profile(name)
    with pytest.raises(InputError):
        store.add_items(name, [{"text": "hello"}])
    assert store.list_profiles() == []


@pytest.mark.parametrize("name", VALID + INVALID + ["Ann", "ann", "ANN"])
def test_file_stem_cannot_leave_its_directory(name, tmp_path):
    stem = names.file_stem(name)
    assert stem and "/" not in stem and "\\" not in stem and ".." not in stem and stem[0] not in ".-"
    assert stem.isascii() and stem.isprintable()
    assert (tmp_path / f"{stem}-profile-sft").resolve().parent == tmp_path.resolve()


def test_file_stems_keep_names_apart_and_plain_names_readable():
    assert names.file_stem("ann") == "ann" and names.file_stem("user_1.x") == "user_1.x"
    stems = {names.file_stem(n) for n in ["ann", "Ann", "ANN", "Zoë", "Zoe", "zoe", "名前", "名字"]}
    assert len(stems) == 8  # case-insensitive file systems included


def test_an_escaping_name_trains_inside_rpo_home(store, rpo_home, tmp_path, monkeypatch):
    """The real pipeline up to the training step: run folder, paraphrase cache, train/held-out
    files all land under RPO_HOME/data/runs, never where the name points."""
    from rpo_local.training import pipeline, sft

    assert rpo_home.parent == tmp_path  # the old code wrote to tmp_path/escape-profile-sft
    legacy_profile(store, ESCAPE)
    store.add_items(ESCAPE, [{"text": f"ok so number {i} is done lol, ttyl {i}"} for i in range(24)])
    seen: list[Path] = []

    def no_torch(model_path, examples, run_dir, *a, **k):
        seen.append(run_dir)
        raise InputError("stopped before training (the test needs no torch)")

    monkeypatch.setattr(sft, "train", no_torch)
    engine = FakeEngine(lambda prompt: "Number three is finished.")
    outcome = pipeline.run_sft(store, ESCAPE, cfg=sft.SFTConfig(), engine=engine, progress=False)
    assert outcome.status == "failed" and "stopped before training" in outcome.reason
    runs = paths.runs_dir().resolve()
    assert seen and seen[0].resolve().parent == runs
    written = files_under(tmp_path)
    assert {p.name for p in written if p.parent.resolve() == seen[0].resolve()} >= {"train.jsonl", "heldout.jsonl"}
    outside = [p for p in written if not p.resolve().is_relative_to(rpo_home.resolve())]
    assert outside == [], f"files written outside RPO_HOME: {outside}"
    assert "ok so number" in (seen[0] / "train.jsonl").read_text()  # the profile's own texts, kept inside


def test_an_escaping_name_logs_inside_the_runs_folder(store, rpo_home, tmp_path):
    from rpo_local.config import load_config
    from rpo_local.scheduler import TrainScheduler

    legacy_profile(store, ESCAPE)
    store.add_items(ESCAPE, [{"text": f"text {i}"} for i in range(8)])
    config = load_config()
    config.train_min_new_items = 8
    sched = TrainScheduler(store, config, command=lambda p: [sys.executable, "-c", "print('{}')"])
    sched.tick()
    deadline = time.monotonic() + 30
    while sched._proc is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        sched.tick()
    logs = [p for p in files_under(tmp_path) if p.suffix in (".log", ".json") and p.name.startswith("auto-")]
    assert logs and all(p.parent.resolve() == paths.runs_dir().resolve() for p in logs)
    assert all(".." not in p.name and p.name.startswith(f"auto-{names.file_stem(ESCAPE)}-") for p in logs)


@pytest.mark.parametrize("name", ["", ESCAPE, "a\nb", "a b"])
def test_cli_refuses_bad_names_with_exit_3(cli, store, name):
    r = cli("history", "add", "--profile", name, "some text")
    assert r.code == 3 and "invalid profile name" in r.stderr and r.stdout == "", r
    r = cli("history", "list", "--profile", name)
    assert r.code == 3, r
    assert store.list_profiles() == []  # "" did not become "default" either


def test_cli_takes_a_unicode_name(cli, store):
    r = cli("history", "add", "--profile", "Zoë", "bonjour tout le monde")
    assert r.code == 0, r
    assert [p["name"] for p in store.list_profiles()] == ["Zoë"]


def test_configured_profile_must_be_valid(cli, monkeypatch):
    from rpo_local.config import load_config, set_value

    with pytest.raises(ConfigError, match="profile"):
        set_value("profile", ESCAPE)
    monkeypatch.setenv("RPO_PROFILE", "a/b")
    with pytest.raises(ConfigError):
        load_config()
    assert cli("history", "list").code == ConfigError.exit_code
