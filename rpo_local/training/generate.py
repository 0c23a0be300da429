"""Batched generation in torch: back-translation paraphrases and RL rollouts on a GPU.

llama.cpp serves one text at a time, which suits a laptop; a GPU's throughput comes from
decoding hundreds of rows at once. Prompts are batched by length (little left padding), each
row stops at the end of turn. torch is imported only in here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def generate(
    model: Any, tok: Any, texts: Sequence[str], eot: str, *, n: int = 1, temperature: float = 0.0,
    top_k: int = 40, top_p: float = 0.95, max_new_tokens: int = 64, batch_size: int = 256,
    seed: int | None = None, progress: bool = True, desc: str = "generate",
) -> list[list[str]]:
    """`n` continuations of each prompt in `texts` (greedy at temperature 0; else sampled with
    top-k/top-p like llama.cpp's defaults, from `seed` when given), up to the end of turn
    (the token `eot`), which is left out. `batch_size` counts generated rows (prompts x n)."""
    import torch
    from tqdm import tqdm

    device = next(model.parameters()).device
    tok.padding_side = "left"  # generation continues every row from its own end
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eot_id = tok.convert_tokens_to_ids(eot)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p} \
        if temperature > 0 else {"do_sample": False}
    encoded = [tok(t, add_special_tokens=False).input_ids for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    per_batch = max(1, batch_size // n)
    out: list[list[str]] = [[] for _ in texts]
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    for start in tqdm(range(0, len(order), per_batch), desc=desc, unit="batch",
                      file=sys.stderr, disable=not progress):
        idx = order[start:start + per_batch]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 num_return_sequences=n, eos_token_id=eot_id, pad_token_id=pad_id, **sampling)
        for row, i in enumerate(j for j in idx for _ in range(n)):
            out[i].append(tok.decode(gen[row, width:], skip_special_tokens=True))
    return out
