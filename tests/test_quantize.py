"""`rpo quantize model` and `rpo quantize merge`: llama.cpp's quantizer, atomic and registered;
the merge's arithmetic on tiny synthetic GGUFs, its survival report on the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rpo_local import paths
from rpo_local.errors import InputError, ModelError
from rpo_local.quantize import file_type, lora_scale, merge_adapter, quantize_model, write_merged

model = pytest.mark.model


@model
def test_a_4_bit_model_is_refused_with_the_reason_and_nothing_is_written(cli):
    out = cli("quantize", "model", "smollm2-135m", "--type", "Q8_0")
    assert out.code == 3 and "already Q4_1" in out.stderr and "--allow-requantize" in out.stderr
    assert out.stdout == "" and not paths.models_dir().exists()


@model
def test_requantized_when_asked_registered_and_loadable(cli):
    out = cli("quantize", "model", "smollm2-135m", "--type", "Q8_0", "--allow-requantize")
    assert out.code == 0, out.stderr
    written = paths.models_dir() / "smollm2-135m-q8_0.gguf"
    assert out.stdout.strip() == str(written) and file_type(written) == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert [p.name for p in paths.models_dir().iterdir()] == [written.name]  # no temporary file left
    listed = {m["name"]: m for m in json.loads(cli("models", "list", "--json").stdout)}
    assert listed["smollm2-135m-q8_0"]["arch"] == "llama" and listed["smollm2-135m-q8_0"]["exists"]
    # The copy keeps its source's adapters: it records the file it came from.
    from rpo_local.adapters import builtin_name, builtins_for, check_base
    from rpo_local.models import SOURCE_KEY, embedded_model_path, gguf_metadata, sha256

    assert gguf_metadata(written)[SOURCE_KEY] == sha256(embedded_model_path()) != sha256(written)
    assert [builtin_name(path) for _, path in builtins_for(written)] == [
        builtin_name(path) for _, path in builtins_for(embedded_model_path())]
    check_base("builtin-lamp7", sha256(embedded_model_path()), written)
    from rpo_local.engine import LlamaEngine

    adapter = builtins_for(written)[0][1]
    assert LlamaEngine(written, n_ctx=256, adapter_path=adapter).adapter_path == adapter  # base checked, loaded
    again = cli("quantize", "model", "smollm2-135m", "--type", "Q8_0", "--allow-requantize")
    assert again.code == 3 and "exists" in again.stderr  # never overwrites a registered model
    mine = written.parent / "mine.gguf"
    mine.write_bytes(b"the user's own file")
    taken = cli("quantize", "model", "smollm2-135m", "--allow-requantize", "--name", "other", "--out", str(mine))
    assert taken.code == 3 and "never overwritten" in taken.stderr and mine.read_bytes() == b"the user's own file"
    escaping = cli("quantize", "model", "smollm2-135m", "--allow-requantize", "--name", "../escaped")
    assert escaping.code == 3 and not (paths.models_dir().parent / "escaped.gguf").exists()


@model
def test_a_failed_quantize_leaves_nothing_behind(tmp_path):
    from rpo_local.adapters import BUILTINS, asset_path

    not_a_model = asset_path(BUILTINS["builtin-lamp7"][0])  # a GGUF, but a LoRA adapter
    with pytest.raises(ModelError):
        quantize_model(not_a_model, tmp_path / "out" / "x.gguf", "Q8_0")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(InputError, match="unknown quantization type"):
        quantize_model(not_a_model, tmp_path / "y.gguf", "Q9_9")


# -- the merge's arithmetic, on synthetic GGUFs (no llama.cpp) ---------------------------------

def test_the_lora_scale_is_llama_cpps():
    assert lora_scale(16.0, 8) == 2.0  # alpha / rank
    assert lora_scale(0.0, 8) == 1.0  # an adapter that records alpha 0 is applied unscaled


def test_a_llama_q_k_row_permutation_commutes_with_the_merge():
    """The export permutes lora_b's Q/K rows as llama.cpp's converter permuted the base's, so the
    merge adds B @ A in the GGUF's layout as it is, with no permutation of its own."""
    from rpo_local.training.export import permute_rows

    rng = np.random.default_rng(0)
    w, b, a = rng.normal(size=(16, 6)), rng.normal(size=(16, 2)), rng.normal(size=(2, 6))
    assert np.allclose(permute_rows(w + b @ a, 4), permute_rows(w, 4) + permute_rows(b, 4) @ a)
    assert not np.allclose(permute_rows(w + b @ a, 4), permute_rows(w, 4) + b @ a)  # the test can fail


def _write_gguf(path: Path, kv: dict, tensors: dict) -> Path:
    """A GGUF with string/float/string-array metadata and (name -> (array, raw_dtype or None)) tensors."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="llama")
    for key, value in kv.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_array(key, value)
    for name, (data, raw) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _synthetic(tmp_path: Path, alpha: float = 4.0) -> tuple[Path, Path, dict]:
    """A base with an F32 and a Q8_0 weight and a norm, and a rank-2 adapter of both weights."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(1)
    q_w = rng.normal(size=(8, 32)).astype(np.float32)
    up_w = rng.normal(size=(64, 32)).astype(np.float32)
    norm = rng.normal(size=32).astype(np.float32)
    base = _write_gguf(tmp_path / "base.gguf", {"general.name": "tiny", "tokenizer.ggml.tokens": ["a", "b"]}, {
        "blk.0.attn_q.weight": (q_w, None),
        "blk.0.ffn_up.weight": (quantize(up_w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0),
        "blk.0.attn_norm.weight": (norm, None),
    })
    lora = {name: (rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=(rows, 2)).astype(np.float32))
            for name, rows in (("blk.0.attn_q.weight", 8), ("blk.0.ffn_up.weight", 64))}
    adapter = _write_gguf(
        tmp_path / "adapter.gguf", {"general.type": "adapter", "adapter.lora.alpha": alpha},
        {f"{name}.lora_{which}": (arr, None) for name, (a, b) in lora.items() for which, arr in (("a", a), ("b", b))},
    )
    return base, adapter, lora


def test_the_merge_adds_the_scaled_delta_and_copies_everything_else(tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    base, adapter, lora = _synthetic(tmp_path)
    out = tmp_path / "merged.gguf"
    assert write_merged(base, adapter, out, {"rpo.merged_adapter": "tiny-lora", "general.name": "tiny + lora"}) == 2
    before, after = GGUFReader(str(base)), GGUFReader(str(out))
    old, new = {t.name: t for t in before.tensors}, {t.name: t for t in after.tensors}
    assert list(new) == list(old)
    for name, (a, b) in lora.items():
        expected = dequantize(old[name].data, old[name].tensor_type) + 2.0 * (b @ a)  # alpha 4 / rank 2
        assert new[name].tensor_type == GGMLQuantizationType.F32
        assert np.allclose(new[name].data, expected, atol=1e-5)
        assert not np.allclose(new[name].data, dequantize(old[name].data, old[name].tensor_type), atol=1e-2)
    norm = "blk.0.attn_norm.weight"  # untouched: the same type and bytes
    assert new[norm].tensor_type == old[norm].tensor_type and new[norm].data.tobytes() == old[norm].data.tobytes()
    assert after.get_field("tokenizer.ggml.tokens").contents() == ["a", "b"]
    assert after.get_field("general.architecture").contents() == "llama"
    assert after.get_field("general.name").contents() == "tiny + lora"  # `meta` replaces a copied key
    assert after.get_field("rpo.merged_adapter").contents() == "tiny-lora"


def test_a_merge_whose_adapter_does_not_fit_the_base_is_refused(tmp_path):
    base, adapter, _ = _synthetic(tmp_path)
    other = _write_gguf(tmp_path / "other.gguf", {"general.name": "other"},
                        {"blk.0.attn_q.weight": (np.zeros((8, 32), np.float32), None)})
    with pytest.raises(ModelError, match="does not have"):
        write_merged(other, adapter, tmp_path / "x.gguf", {})
    narrow = _write_gguf(tmp_path / "narrow.gguf", {"general.name": "narrow"}, {
        "blk.0.attn_q.weight": (np.zeros((8, 16), np.float32), None),
        "blk.0.ffn_up.weight": (np.zeros((64, 32), np.float32), None),
    })
    with pytest.raises(ModelError, match="attn_q.weight is 8x32, narrow.gguf has 8x16"):
        write_merged(narrow, adapter, tmp_path / "y.gguf", {})


# -- merging the shipped adapter into the embedded model ----------------------------------------

@model
def test_a_q8_0_merge_keeps_the_adapters_effect_and_is_registered(cli):
    out = cli("quantize", "merge", "--adapter", "builtin-lamp7", "--type", "Q8_0", "--json")
    assert out.code == 0, out.stderr
    report = json.loads(out.stdout)
    written = paths.models_dir() / "smollm2-135m-builtin-lamp7-q8_0.gguf"
    assert report["name"] == "smollm2-135m-builtin-lamp7-q8_0" and report["path"] == str(written)
    assert file_type(written) == 7 and [p.name for p in paths.models_dir().iterdir()] == [written.name]
    # Close to the base with its adapter at run time, far from the base alone (survival 0 there).
    assert report["survival"] > 0.8 and 0.9 < report["kept"] < 1.1, report
    assert "survives Q8_0" in out.stderr and "warning" not in out.stderr
    listed = {m["name"]: m for m in json.loads(cli("models", "list", "--json").stdout)}
    assert listed["smollm2-135m-builtin-lamp7-q8_0"]["arch"] == "llama"
    from rpo_local.adapters import builtins_for

    assert builtins_for(written) == []  # the adapter is in it already: none is applied on top
    again = cli("quantize", "merge", "--adapter", "builtin-lamp7")
    assert again.code == 3 and "exists" in again.stderr  # never overwrites a registered model
    mine = written.parent / "mine.gguf"
    mine.write_bytes(b"the user's own file")
    taken = cli("quantize", "merge", "--adapter", "builtin-lamp7", "--name", "other", "--out", str(mine))
    assert taken.code == 3 and "never overwritten" in taken.stderr and mine.read_bytes() == b"the user's own file"


@model
def test_an_f16_merge_keeps_nearly_all_of_it_and_its_trajectory_format(model_path, tmp_path):
    from rpo_local.adapters import BUILTINS, asset_path
    from rpo_local.engine import LlamaEngine

    adapter = asset_path(BUILTINS["builtin-lamp7-answer"][0])
    report = merge_adapter(model_path, adapter, tmp_path / "m.gguf", "F16")
    # Not 1: the merged file runs other kernels than Q4_1 + an F16 LoRA (a few percent of the
    # logits), which weighs more against this smaller adapter's change (0.80 measured; 0.93
    # for builtin-lamp7). A merge that drops the delta scores ~0 on both.
    assert report.survival > 0.7 and abs(report.kept - 1) < 0.05, report
    assert file_type(tmp_path / "m.gguf") == 1  # LLAMA_FTYPE_MOSTLY_F16
    # The merged model is prompted in its adapter's format (answer only), not the default one.
    engine = LlamaEngine(tmp_path / "m.gguf", n_ctx=256)
    engine.set_adapter(None)
    assert engine.adapter_format == "answer"


@model
def test_a_merge_that_drops_the_delta_is_reported_as_lost(cli, monkeypatch):
    """The survival measure catches a broken merge: with B zeroed the file is the base alone."""
    import rpo_local.quantize as quantize

    real = quantize.lora_deltas
    monkeypatch.setattr(quantize, "lora_deltas",
                        lambda path: {k: (a, np.zeros_like(b), s) for k, (a, b, s) in real(path).items()})
    out = cli("quantize", "merge", "--adapter", "builtin-lamp7", "--type", "Q8_0", "--json")
    assert out.code == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["survival"] < 0.3 and abs(report["kept"]) < 0.2, report
    assert "warning: most of builtin-lamp7's effect is lost in Q8_0" in out.stderr


@model
def test_a_failed_or_interrupted_merge_leaves_nothing_behind(cli, model_path, tmp_path, monkeypatch):
    import rpo_local.quantize as quantize
    from rpo_local.adapters import BUILTINS, asset_path

    adapter = asset_path(BUILTINS["builtin-lamp7"][0])
    folder = tmp_path / "out"

    def failing(*args):
        raise ModelError("llama.cpp could not quantize")  # after the F32 merge was written

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C while the logits are compared: both temporary files exist

    real_quantize = quantize._quantize
    monkeypatch.setattr(quantize, "_quantize", failing)
    with pytest.raises(ModelError):
        merge_adapter(model_path, adapter, folder / "x.gguf", "Q8_0")
    assert list(folder.iterdir()) == []
    monkeypatch.setattr(quantize, "_quantize", real_quantize)
    monkeypatch.setattr(quantize, "survival", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(model_path, adapter, folder / "x.gguf", "Q8_0")
    assert list(folder.iterdir()) == []
    out = cli("quantize", "merge", "--adapter", "builtin-lamp7-qwen1.5b")  # trained for another base
    assert out.code == 11 and "another base model" in out.stderr and out.stdout == ""
    assert not paths.models_dir().exists()
    none = cli("quantize", "merge", "--adapter", "none")
    assert none.code == 3 and "nothing to merge" in none.stderr
