"""The exported GGUF adapter changes llama.cpp's logits the way peft changes torch's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from rpo_local.training.export import permute_rows, unpermute_rows


def test_unpermute_inverts_permute():
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    assert not np.array_equal(permute_rows(w, 4), w)
    assert np.array_equal(unpermute_rows(permute_rows(w, 4), 4), w)


def _write_adapter(path, blocks: list[int], modules: list[str], rank: int, alpha: float):
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch="llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for blk in blocks:
        for name in modules:
            w.add_tensor(f"blk.{blk}.{name}.weight.lora_a", np.zeros((rank, 16), np.float32))
            w.add_tensor(f"blk.{blk}.{name}.weight.lora_b", np.zeros((16, rank), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_continuing_from_an_adapter_takes_its_shape(tmp_path):
    """Per-user training starts from the shipped adapter: a LoRA of another rank or on fewer
    blocks would silently drop part of it (load_gguf_lora loads what matches). Which blocks
    learn is still the caller's `top_layers`."""
    from rpo_local.errors import ModelError
    from rpo_local.training import export, sft

    top2 = _write_adapter(tmp_path / "top2.gguf", [28, 29], ["attn_q", "ffn_down"], rank=4, alpha=8.0)
    assert export.adapter_layout(top2) == (8.0, 4, [28, 29], ("q_proj", "down_proj"))
    cfg = sft.fit_to_adapter(sft.SFTConfig(rank=8, alpha=16.0, top_layers=10, init_adapter=str(top2)), 30)
    assert (cfg.rank, cfg.alpha, cfg.targets) == (4, 8.0, ("q_proj", "down_proj"))
    assert (cfg.lora_layers, cfg.top_layers) == (10, 10)  # the wider of the two carries a LoRA

    every = _write_adapter(tmp_path / "all.gguf", list(range(30)), ["attn_v"], rank=8, alpha=16.0)
    cfg = sft.fit_to_adapter(sft.SFTConfig(top_layers=10, init_adapter=str(every)), 30)
    assert (cfg.lora_layers, cfg.top_layers) == (0, 10)  # LoRA on all 30 blocks, the top 10 learn
    assert sft.fit_to_adapter(sft.SFTConfig(top_layers=0, init_adapter=str(top2)), 30).lora_layers == 0

    gap = _write_adapter(tmp_path / "gap.gguf", [27, 29], ["attn_q"], rank=4, alpha=8.0)
    with pytest.raises(ModelError):
        sft.fit_to_adapter(sft.SFTConfig(init_adapter=str(gap)), 30)


@pytest.mark.model
def test_training_on_top_of_the_shipped_adapter_keeps_its_lower_blocks(tmp_path, model_path):
    """Per-user training from the all-block shipped adapter with --top-layers 2: blocks 0-27
    keep the shipped LoRA exactly (applied, not learning, no gradient computed), blocks 28-29
    learn, and the exported adapter still covers all 30 blocks."""
    from rpo_local.adapters import builtin_adapter_path
    from rpo_local.training import dataset, export, sft

    shipped = builtin_adapter_path()
    example = dataset.make_example(dataset.gguf_chat_template(model_path), "u", "I am going to the shop now.",
                                   "off 2 the shop lol", ["lol ok", "brb shop"])
    cfg = sft.SFTConfig(steps=1, batch_size=1, grad_accum=1, lr=5e-2, top_layers=2, init_adapter=str(shipped))
    model, _ = sft.train(model_path, [example], tmp_path / "run", cfg, progress=False)
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert learning and all(".layers.28." in n or ".layers.29." in n for n in learning)

    out = export.export_gguf(model, tmp_path / "user.lora.gguf")
    assert export.adapter_layout(out)[2] == list(range(30))
    _, before = export.read_gguf_lora(shipped)
    _, after = export.read_gguf_lora(out)
    for name, value in after.items():
        block = int(name.split(".")[1])
        same = np.allclose(value, before[name], atol=1e-3)
        assert same == (block < 28), name


def test_the_shipped_adapter_covers_every_block():
    from rpo_local.adapters import builtin_adapter_path
    from rpo_local.training import export

    alpha, rank, blocks, targets = export.adapter_layout(builtin_adapter_path())
    assert blocks == list(range(30)) and rank == 8 and len(targets) == 7


def _llama_logits(llm, tokens: list[int]) -> np.ndarray:
    import llama_cpp

    llm.reset()
    llm.eval(tokens)  # without logits_all, llama-cpp-python keeps no scores: read the context's
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def _llama_greedy(llm, tokens: list[int], n: int) -> list[int]:
    out = []
    seq = list(tokens)
    for _ in range(n):
        nxt = int(np.argmax(_llama_logits(llm, seq)))
        out.append(nxt)
        seq.append(nxt)
    return out


QWEN = Path(os.environ.get("RPO_TEST_QWEN", Path(__file__).resolve().parents[1] / ".models" /
                           "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))


@pytest.fixture(params=["llama", "qwen2"])
def base_gguf(request, model_path) -> Path:
    """The embedded SmolLM2 (llama: Q/K rows permuted by llama.cpp's converter) and
    Qwen2.5-Coder-0.5B (qwen2: no permutation, attention biases) when fetched."""
    if request.param == "llama":
        return model_path
    if not QWEN.is_file():
        pytest.skip(f"Qwen2.5-Coder-0.5B not fetched ({QWEN}; `make models`)")
    return QWEN


@pytest.mark.model
@pytest.mark.train
def test_logit_delta_matches_torch(tmp_path, base_gguf):
    import torch

    from rpo_local.engine import LlamaEngine
    from rpo_local.models import gguf_metadata
    from rpo_local.training import export, sft

    model_path = base_gguf

    torch.manual_seed(0)
    cfg = sft.SFTConfig(rank=4, alpha=8.0, dropout=0.0)
    base, tok = sft.load_base(model_path)
    model = sft.add_lora(base, cfg)
    # peft starts with B = 0 (no change). Give it one well above llama.cpp's own noise: Q4_1
    # matmuls quantize activations per block, which alone moves logits by ~0.5 on any perturbation.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    model.eval()
    path = export.export_gguf(model, tmp_path / "rand.lora.gguf")
    assert gguf_metadata(path)["general.architecture"] == gguf_metadata(model_path)["general.architecture"]

    # Both models speak ChatML (their templates' format); the raw turn keeps the prompt identical.
    text = "<|im_start|>user\nWrite a short note about the weather today.<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        t_lora = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        with model.disable_adapter():
            t_base = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        t_greedy = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()

    engine = LlamaEngine(model_path, n_ctx=256)
    assert engine.llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    l_base = _llama_logits(engine.llm, ids)
    engine.set_adapter(path)
    llm_before = engine.llm
    l_lora = _llama_logits(engine.llm, ids)
    l_greedy = _llama_greedy(engine.llm, ids, 6)

    d_torch, d_cpp = t_lora - t_base, l_lora - l_base
    assert d_torch.std() > 1.0, "the random LoRA should move the logits far more than the noise"
    cosine = float(d_torch @ d_cpp / (np.linalg.norm(d_torch) * np.linalg.norm(d_cpp)))
    # Q4_K_M Qwen2 (151k-token vocabulary) measured 0.988 here, Q4_1 SmolLM2 above 0.99; a wrong
    # Q/K permutation or tensor name gives far less.
    llama = gguf_metadata(model_path)["general.architecture"] == "llama"
    assert cosine >= (0.99 if llama else 0.98), f"logit-delta cosine {cosine:.4f}"
    if llama:  # greedy agreement holds for SmolLM2; Qwen's is noisier under Q4_K_M
        assert l_greedy == t_greedy
    else:
        assert l_greedy[0] in np.argsort(t_lora)[-5:], "llama.cpp's first token is among torch's top 5"

    engine.set_adapter(None)  # hot swap back: same llama object, base logits again
    assert engine.llm is llm_before
    assert np.allclose(_llama_logits(engine.llm, ids), l_base, atol=1e-3)

    # And the GGUF reads back into peft as the same LoRA (per-user training starts from it).
    fresh = sft.add_lora(sft.load_base(model_path)[0], cfg)
    export.load_gguf_lora(fresh, path)
    src = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        if "lora_" in name:
            assert torch.allclose(p, src[name], atol=1e-3, rtol=1e-3), name  # f16 file


@pytest.mark.model
def test_bad_adapter_file_raises_model_error(tmp_path, real_engine):
    from rpo_local.errors import ModelError

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError):
        real_engine.set_adapter(junk)
    with pytest.raises(ModelError):
        real_engine.set_adapter(tmp_path / "missing.gguf")
