"""`rpo quantize model`: llama.cpp's quantizer on the embedded model, atomic and registered."""

from __future__ import annotations

import json

import pytest

from rpo_local import paths
from rpo_local.errors import InputError, ModelError
from rpo_local.quantize import file_type, quantize_model

pytestmark = pytest.mark.model


def test_a_4_bit_model_is_refused_with_the_reason_and_nothing_is_written(cli):
    out = cli("quantize", "model", "smollm2-135m", "--type", "Q8_0")
    assert out.code == 3 and "already Q4_1" in out.stderr and "--allow-requantize" in out.stderr
    assert out.stdout == "" and not paths.models_dir().exists()


def test_requantized_when_asked_registered_and_loadable(cli):
    out = cli("quantize", "model", "smollm2-135m", "--type", "Q8_0", "--allow-requantize")
    assert out.code == 0, out.stderr
    written = paths.models_dir() / "smollm2-135m-q8_0.gguf"
    assert out.stdout.strip() == str(written) and file_type(written) == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert [p.name for p in paths.models_dir().iterdir()] == [written.name]  # no temporary file left
    listed = {m["name"]: m for m in json.loads(cli("models", "list", "--json").stdout)}
    assert listed["smollm2-135m-q8_0"]["arch"] == "llama" and listed["smollm2-135m-q8_0"]["exists"]
    again = cli("quantize", "model", "smollm2-135m", "--type", "Q8_0", "--allow-requantize")
    assert again.code == 3 and "exists" in again.stderr  # never overwrites a registered model
    mine = written.parent / "mine.gguf"
    mine.write_bytes(b"the user's own file")
    taken = cli("quantize", "model", "smollm2-135m", "--allow-requantize", "--name", "other", "--out", str(mine))
    assert taken.code == 3 and "never overwritten" in taken.stderr and mine.read_bytes() == b"the user's own file"
    escaping = cli("quantize", "model", "smollm2-135m", "--allow-requantize", "--name", "../escaped")
    assert escaping.code == 3 and not (paths.models_dir().parent / "escaped.gguf").exists()


def test_a_failed_quantize_leaves_nothing_behind(tmp_path):
    from rpo_local.adapters import BUILTINS, asset_path

    not_a_model = asset_path(BUILTINS["builtin-lamp7"][0])  # a GGUF, but a LoRA adapter
    with pytest.raises(ModelError):
        quantize_model(not_a_model, tmp_path / "out" / "x.gguf", "Q8_0")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(InputError, match="unknown quantization type"):
        quantize_model(not_a_model, tmp_path / "y.gguf", "Q9_9")
