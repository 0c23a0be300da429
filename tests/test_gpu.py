"""The GPU backends for real: the embedded model and its shipped adapter on the CUDA or Metal
build of llama.cpp, checked against the same model on the CPU. Skipped, with the reason, where
llama.cpp was built without a GPU backend (CI, `make install`); `make install-cuda` or a Mac
build runs them."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.model

PROMPT = "Thank you for your message. I have reviewed the proposal and I think we should wait."


def _gpu_build() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


requires_gpu = pytest.mark.skipif(not _gpu_build(), reason="llama.cpp here has no GPU backend (CPU-only build)")


def _last_logits(engine, text: str) -> np.ndarray:
    import llama_cpp

    llm = engine.llm
    llm.reset()
    llm.eval(llm.tokenize(text.encode(), add_bos=False))
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).astype(np.float64)


@pytest.fixture(scope="module")
def engines(model_path):
    from rpo_local.engine import LlamaEngine

    gpu = LlamaEngine(model_path, n_ctx=512, gpu_layers="all", speculative=False)
    cpu = LlamaEngine(model_path, n_ctx=512, gpu_layers="none", speculative=False)
    return gpu, cpu


@requires_gpu
def test_every_layer_is_offloaded(engines):
    gpu, cpu = engines
    on, total = gpu.offloaded
    assert on == total > 0 and gpu.backend != "CPU"
    assert cpu.offloaded[0] == 0 and cpu.backend == "CPU"


@requires_gpu
def test_adapter_on_the_gpu_changes_logits_as_on_the_cpu_and_hot_swaps(engines):
    """The shipped adapter's logit change on the GPU points where the CPU's does, and switching
    it off and on again gives back the same logits: adapters work on the backend the runtime uses."""
    from rpo_local.adapters import builtin_adapter_path

    gpu, cpu = engines
    adapter = builtin_adapter_path(gpu.model_path)
    deltas = []
    for engine in (gpu, cpu):
        engine.set_adapter(None)
        base = _last_logits(engine, PROMPT)
        engine.set_adapter(adapter)
        tuned = _last_logits(engine, PROMPT)
        deltas.append(tuned - base)
    cosine = float(deltas[0] @ deltas[1] / (np.linalg.norm(deltas[0]) * np.linalg.norm(deltas[1])))
    assert cosine > 0.98, cosine
    gpu_tuned = _last_logits(gpu, PROMPT)
    gpu.set_adapter(None)
    assert not np.allclose(_last_logits(gpu, PROMPT), gpu_tuned)
    gpu.set_adapter(adapter)
    assert np.allclose(_last_logits(gpu, PROMPT), gpu_tuned)
    assert int(np.argmax(gpu_tuned)) == int(np.argmax(_last_logits(cpu, PROMPT)))  # same greedy token


@requires_gpu
def test_a_rewrite_runs_on_the_gpu(engines, store):
    from rpo_local.config import Config
    from rpo_local.reflect import Reflector

    gpu, _ = engines
    for text in ("nah lol", "ok sounds good tbh"):
        store.add_item("sam", text, kind="tweet")
    result = Reflector(store, gpu, Config()).rewrite(PROMPT, "sam", log=False)
    assert result.rewrite.strip()
