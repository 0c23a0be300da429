"""pyproject declares what the code imports, and nothing it does not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"llama-cpp-python": "llama_cpp", "sqlite-utils": "sqlite_utils", "rouge-score": "rouge_score",
                "optimum-onnx": "optimum"}


def declared(group: str | None = None) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return [re.match(r"[A-Za-z0-9_.-]+", s).group(0) for s in specs]


def imported() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "rpo_local").rglob("*.py"):
        found |= set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", path.read_text(), re.M))
    return found


def test_every_declared_runtime_and_training_dependency_is_imported():
    names = imported()
    for group in (None, "train", "eval", "retrieval", "retrieval-export"):
        unused = [d for d in declared(group) if IMPORT_NAMES.get(d, d.replace("-", "_")) not in names]
        assert unused == [], f"declared in {group or 'dependencies'} but never imported: {unused}"


def test_the_daemon_starts_without_fastapi():
    probe = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from rpo_local.server import create_app\n"
        "from rpo_local.cli import main\n"
        "main(['serve', '--help'])\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "--upstream" in r.stdout, r.stderr
