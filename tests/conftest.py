"""Shared fixtures: an isolated RPO_HOME per test, the fake engine, the real embedded model,
and the LaMP-7 data from ../shared (read at run time, never copied)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakes import FakeEngine

ROOT = Path(__file__).resolve().parents[1]
LAMP7 = Path(os.environ.get("RPO_LAMP7", ROOT.parent / "shared" / "data" / "lamp7" / "dev.jsonl"))


@pytest.fixture(scope="session")
def torch_models(tmp_path_factory) -> Path:
    """One folder of GGUF models converted for torch, shared by every test of the session
    (each conversion takes 30-80 s; the first test that loads a model makes it)."""
    return tmp_path_factory.mktemp("torch-models")


@pytest.fixture(autouse=True)
def rpo_home(tmp_path, monkeypatch, torch_models) -> Path:
    """Every test gets its own RPO_HOME: database, config and adapters under tmp_path; only the
    torch conversions of the models are shared."""
    from rpo_local import paths

    home = tmp_path / "rpo-home"
    monkeypatch.setenv("RPO_HOME", str(home))
    for var in [v for v in os.environ if v.startswith("RPO_") and v not in ("RPO_HOME", "RPO_LAMP7")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "1")
    paths.ensure_dir(paths.cache_dir())
    paths.torch_models_dir().symlink_to(torch_models, target_is_directory=True)
    return home


@pytest.fixture
def store(rpo_home):
    from rpo_local.store import Store

    with Store.open() as s:
        yield s


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def use_fake_engine(monkeypatch, fake_engine):
    """Make every `open_engine` call (CLI included) return the fake engine."""
    import rpo_local.engine as engine_mod

    monkeypatch.setattr(engine_mod, "open_engine", lambda *a, **k: fake_engine)
    return fake_engine


@pytest.fixture(scope="session")
def model_path() -> Path:
    from rpo_local.models import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def real_engine(model_path):
    """The embedded SmolLM2-135M-Instruct through llama.cpp, loaded once per session."""
    from rpo_local.engine import LlamaEngine

    return LlamaEngine(model_path, n_ctx=2048)


@pytest.fixture(scope="session")
def lamp7() -> Path:
    if not LAMP7.is_file():
        pytest.skip(f"LaMP-7 data not found at {LAMP7}")
    return LAMP7


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


@pytest.fixture
def cli(monkeypatch):
    """Run `rpo ARGS` in-process with bytes on stdin; returns exit code, stdout and stderr apart."""
    import io

    from rpo_local.cli import main

    def run(*args: str, stdin: bytes | None = b"", tty: bool = False) -> CliResult:
        class In(io.TextIOWrapper):
            def isatty(self) -> bool:
                return tty

        out, err = io.StringIO(), io.StringIO()
        monkeypatch.setattr(sys, "stdin", In(io.BytesIO(stdin or b""), encoding="utf-8"))
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return CliResult(code, out.getvalue(), err.getvalue())

    return run
