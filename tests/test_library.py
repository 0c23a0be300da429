"""The README's library example is what the CLI does: the same adapter, the same rewrite."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def library_snippet() -> str:
    match = re.search(r"### As a library\n+```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert match, "README has a library example"
    return match.group(1)


def run_snippet() -> tuple[dict, str]:
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(library_snippet(), "README.md", "exec"), scope)
    scope["store"].close()
    return scope, out.getvalue()


def test_the_documented_example_runs_with_the_profiles_adapter(monkeypatch, fake_engine):
    """Fast: the engine is the fake, and what matters is the adapter it is opened with."""
    import rpo_local.engine as engine_mod
    from rpo_local.adapters import builtin_adapter_path

    def open_engine(config=None, *, model=None, adapter=None):
        fake_engine.adapter_path = adapter
        return fake_engine

    monkeypatch.setattr(engine_mod, "open_engine", open_engine)
    scope, printed = run_snippet()
    result = scope["result"]
    assert builtin_adapter_path() is not None and result.adapter == str(builtin_adapter_path())
    assert result.profile == "me" and result.retrieved, "rewritten for the profile named at open, with its history"
    assert result.rewrite in printed


@pytest.mark.model
def test_the_documented_example_gives_what_the_cli_gives(cli):
    scope, _ = run_snippet()
    library = scope["result"]
    r = cli("rewrite", "--profile", "me", "--json", "--no-log", stdin=library.input.encode())
    assert r.code == 0, r
    doc = json.loads(r.stdout)
    assert library.adapter is not None and library.adapter == doc["adapter"]
    assert (library.rewrite, library.fallback) == (doc["rewrite"], doc["fallback"])
    assert not library.fallback and library.rewrite != library.input, "the example's reply is one the adapter rewrites"
