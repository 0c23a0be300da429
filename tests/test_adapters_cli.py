"""`rpo adapters` and hot-swapping adapters in a running llama.cpp engine (real model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.model


def make_adapter(path: Path, seed: int, scale: float = 0.3, rank: int = 4) -> Path:
    """A random LoRA on the top two blocks' V and down projections (no torch needed)."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for layer in (28, 29):
        for name, n_in, n_out in (("attn_v", 576, 192), ("ffn_down", 1536, 576)):
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_a",
                              (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32))
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_b",
                              (rng.standard_normal((n_out, rank)) * scale).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def two_adapters(store, rpo_home, tmp_path):
    store.add_items("ann", [{"text": "walking the dog lol"}, {"text": "pizza w/ the crew"}])
    a = make_adapter(tmp_path / "a.lora.gguf", 1)
    b = make_adapter(tmp_path / "b.lora.gguf", 2)
    store.register_adapter("a", a, profile="ann")
    store.register_adapter("b", b, profile="ann")
    return a, b


def _active(cli) -> str | None:
    r = cli("adapters", "list", "--profile", "ann", "--json")
    assert r.code == 0, r
    return json.loads(r.stdout)["active"]


def test_activate_rollback_remove(cli, two_adapters, store):
    r = cli("adapters", "list", "--profile", "ann", "--json")
    names = [e["name"] for e in json.loads(r.stdout)["adapters"]]
    assert {"a", "b"} <= set(names)
    assert cli("adapters", "activate", "a", "--profile", "ann").code == 0
    assert cli("adapters", "activate", "b", "--profile", "ann").code == 0
    assert _active(cli) == "b"
    r = cli("adapters", "remove", "b")
    assert r.code == 3 and "active" in r.stderr  # in use: refused, nothing lost
    assert Path(store.get_adapter("b")["path"]).is_file()
    assert cli("adapters", "rollback", "--profile", "ann").code == 0
    assert _active(cli) == "a"
    assert cli("adapters", "remove", "b").code == 0
    assert "b" not in [e["name"] for e in json.loads(cli("adapters", "list", "--profile", "ann", "--json").stdout)["adapters"]]
    assert cli("adapters", "activate", "none", "--profile", "ann").code == 0
    assert _active(cli) is None
    r = cli("adapters", "activate", "nope", "--profile", "ann")
    assert r.code == 8 and r.stdout == ""


def test_bad_adapter_is_never_activated(cli, two_adapters, store, tmp_path):
    assert cli("adapters", "activate", "a", "--profile", "ann").code == 0
    broken = tmp_path / "broken.lora.gguf"
    broken.write_bytes(two_adapters[0].read_bytes()[:300])  # truncated: GGUF magic, no tensors
    store.register_adapter("broken", broken, profile="ann")
    r = cli("adapters", "activate", "broken", "--profile", "ann")
    assert r.code == 4 and "adapter" in r.stderr.lower()
    assert _active(cli) == "a"  # the previous adapter stays


def test_hot_swap_keeps_the_base_loaded(real_engine, two_adapters):
    a, b = two_adapters
    llm = real_engine.llm
    prompt = "<|im_start|>user\nSay something about dogs.<|im_end|>\n<|im_start|>assistant\n"

    def complete() -> str:
        return "".join(real_engine.stream(prompt, max_tokens=12, stop=["<|im_end|>"]))

    try:
        base = complete()
        real_engine.set_adapter(a)
        with_a = complete()
        real_engine.set_adapter(b)
        with_b = complete()
        real_engine.set_adapter(None)
        again = complete()
    finally:
        real_engine.set_adapter(None)
    assert real_engine.llm is llm  # swapped in place, never reloaded
    assert with_a != base and with_b != with_a
    assert again == base  # switching back restores the base model exactly
