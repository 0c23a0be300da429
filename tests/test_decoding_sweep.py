"""train/sweep_decoding.py: selection rules over several rewrites of a text, and the candidates
written by the product's own rewrite (real model)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("sweep_decoding", ROOT / "train" / "sweep_decoding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(generic: str, gold: str, *candidates: tuple[str, bool]) -> dict:
    return {"id": "1", "generic": generic, "gold": gold,
            "candidates": [{"text": t, "fallback": f} for t, f in candidates]}


def test_consensus_picks_the_candidate_the_others_agree_with():
    sweep = _script()
    odd = "completely different words here"
    central = "i love the pasta place downtown"
    near = ["i love the pasta place", "love the pasta place downtown", "i love pasta place downtown"]
    assert sweep.consensus([odd, central, *near], [odd, central, *near]) == central
    # The generic text may win only where it is among the hypotheses.
    generic = "i love the pasta place downtown a lot"
    assert sweep.consensus([odd, *near], [odd, *near, generic]) in (generic, *near)


def test_retry_and_agreement_gate():
    sweep = _script()
    generic = "The place is good and I love pasta."
    row = _row(generic, "its hella good", (generic, False), ("the place is good", True), ("place good, love pasta", False))
    assert sweep.retry(row) == "place good, love pasta"  # greedy equal to the generic, sample 1 refused
    agreeing = _row(generic, "x", ("place is good love pasta", False), ("place is good love pasta!", False))
    assert sweep.agreement_gate(0.5)(agreeing) == "place is good love pasta"
    lone = _row(generic, "x", ("place is good love pasta", False), ("totally unrelated words", False))
    assert sweep.agreement_gate(0.5)(lone) == generic


def test_table_scores_every_rule_against_copy_and_greedy():
    sweep = _script()
    rows = [_row("the place is good", "place is hella good", ("place is hella good", False),
                 ("the place good", False)) for _ in range(3)]
    text = sweep.table(rows)
    assert "3 users, 2 candidates each" in text
    for name in sweep.RULES:
        assert f"| {name} |" in text
    assert "| greedy | 1.0000 |" in text  # the greedy candidate is the user's text


def test_refuses_the_evaluation_users(tmp_path):
    proc = subprocess.run([sys.executable, "train/sweep_decoding.py", "--model", "x", "--adapter", "y",
                           "--offset", "0", "--out", str(tmp_path / "c.jsonl")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "evaluation users" in proc.stderr
    assert not (tmp_path / "c.jsonl").exists()


def test_saved_candidates_drop_a_torn_line_and_refuse_other_settings(tmp_path):
    sweep = _script()
    settings = {"model": "m.gguf", "adapter": "a.gguf", "samples": 2, "temperature": 0.8, "retriever": "bm25", "k": 4}
    row = {**_row("g", "t", ("x", False)), "settings": settings}
    out = tmp_path / "c.jsonl"
    out.write_text(json.dumps(row) + "\n" + '{"id": "2", "sett')  # killed mid-line
    assert list(sweep.saved_rows(out, settings)) == ["1"]
    assert out.read_text() == json.dumps(row) + "\n"  # the torn line is gone, the row kept
    with pytest.raises(ValueError, match="other settings"):
        sweep.saved_rows(out, {**settings, "samples": 6})
    assert out.read_text() == json.dumps(row) + "\n"


def test_other_settings_in_the_out_file_exit_2_and_leave_it_alone(tmp_path):
    out = tmp_path / "c.jsonl"
    text = json.dumps({**_row("g", "t", ("x", False)), "settings": {"model": "other.gguf"}}) + "\n"
    out.write_text(text)
    proc = subprocess.run([sys.executable, "train/sweep_decoding.py", "--model", "m.gguf", "--adapter", "a.gguf",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "other settings" in proc.stderr
    assert out.read_text() == text


@pytest.mark.model
def test_candidates_are_the_products_rewrites_and_a_rerun_resumes(tmp_path, lamp7):
    from dataclasses import replace

    from rpo_local import lamp
    from rpo_local.config import load_config
    from rpo_local.engine import open_engine
    from rpo_local.evaluate import PROFILE, load_profile, user_store
    from rpo_local.models import embedded_model_path
    from rpo_local.reflect import Reflector

    adapter = ROOT / "rpo_local" / "assets" / "reflect-lamp7-answer.lora.gguf"
    out = tmp_path / "candidates.jsonl"
    cmd = [sys.executable, "train/sweep_decoding.py", "--lamp", str(lamp7), "--model", str(embedded_model_path()),
           "--adapter", str(adapter), "-n", "2", "--samples", "2", "--out", str(out)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| consensus |" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    data = lamp.load_jsonl(lamp7)
    users = lamp.select(data.users, offset=946, limit=2)
    assert [r["id"] for r in rows] == [str(u.id) for u in users]
    assert all(len(r["candidates"]) == 3 for r in rows)

    # The first candidate is exactly what the product's greedy rewrite gives.
    config = replace(load_config(), retriever="bm25", k=4, temperature=0.0)
    engine = open_engine(config, model=embedded_model_path(), adapter=adapter)
    user = users[0]
    with user_store(tmp_path / "u.db") as store:
        load_profile(store, data.task, user, "bm25")
        greedy = Reflector(store, engine, config).rewrite(rows[0]["generic"], PROFILE, k=4, log=False)
    assert rows[0]["candidates"][0]["text"] == greedy.rewrite.strip()

    before = out.read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert out.read_text() == before  # every user was done: nothing rewritten, nothing appended
    assert again.stdout == proc.stdout
