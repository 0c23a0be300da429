"""The exported GGUF adapter changes llama.cpp's logits the way peft changes torch's."""

from __future__ import annotations

import numpy as np
import pytest

from rpo_local.training.export import permute_rows, unpermute_rows


def test_unpermute_inverts_permute():
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    assert not np.array_equal(permute_rows(w, 4), w)
    assert np.array_equal(unpermute_rows(permute_rows(w, 4), 4), w)


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


@pytest.mark.model
@pytest.mark.train
def test_logit_delta_matches_torch(tmp_path, model_path):
    import torch

    from rpo_local.engine import LlamaEngine
    from rpo_local.training import export, sft

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
    path = export.export_gguf(model, tmp_path / "rand.lora.gguf", alpha=cfg.alpha)

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
    assert cosine >= 0.99, f"logit-delta cosine {cosine:.4f}"
    assert l_greedy == t_greedy

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
