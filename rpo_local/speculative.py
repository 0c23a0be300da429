"""Greedy decoding on llama.cpp's batch API, with drafts from a source text verified in one batch.

A rewrite mostly copies the text it rewrites, so the next tokens are usually known: `Drafter`
proposes the continuation of the source (the generic reply) aligned to what has been generated
(prompt-lookup decoding), and `GreedyDecoder` evaluates the pending token and the drafted ones in
one `llama_decode`, with logits for those positions only, and keeps the drafted tokens while they
equal the argmax: the output is token for token what plain greedy decoding gives. Rejected
tokens are removed from the KV cache.

Why not llama-cpp-python's own `Llama(draft_model=LlamaPromptLookupDecoding())`: it switches
the context to `logits_all`, so every prompt token also gets its (49k-wide) logits computed and
copied into a numpy array, and it drafts a fixed 10 tokens whenever the last 1-2 tokens occur
anywhere in the prompt. On a CPU a batch costs nearly its length in single-token steps, so long
drafts that fail cost more than they save (measured 26-32 vs 63 tokens/s on 2 cores).

The decoder keeps `Llama.input_ids`/`n_tokens` in step with the KV cache, so the prefix reuse of
`Llama.generate` (and of the next call here) sees exactly what is cached.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Drafted tokens per verification batch. On 2 CPU cores a batch of n tokens costs about
# 10 + 8n ms against ~18 ms for one token (SmolLM2-135M with its adapter), so a drafted
# token pays off while it is more likely than not to be accepted (bench/bench_rewrite.py).
MAX_DRAFT = 6
MAX_NGRAM = 3  # longest tail of the output looked up in the source


@dataclass
class DecodeStats:
    """Counters over an engine's life (bench/bench_rewrite.py reports them)."""

    tokens: int = 0  # tokens generated
    drafted: int = 0  # tokens proposed by the drafter
    accepted: int = 0  # drafted tokens that greedy decoding confirmed
    decodes: int = 0  # llama_decode calls while generating
    reused: int = 0  # prompt tokens found in the KV cache (a prefix shared with the previous call)


class Drafter:
    """Proposes the next tokens of `source` that follow the tail of the output so far."""

    def __init__(self, source: Sequence[int], max_draft: int = MAX_DRAFT, max_ngram: int = MAX_NGRAM) -> None:
        self.source = list(source)
        self.max_draft = max_draft
        self.max_ngram = max_ngram
        self._index: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions after it
        for n in range(1, max_ngram + 1):
            for i in range(len(self.source) - n + 1):
                self._index.setdefault(tuple(self.source[i : i + n]), []).append(i + n)
        self._cursor = 0  # where the last proposal started: the alignment to continue from

    def propose(self, output: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens: the source's continuation of the longest matching tail of `output`."""
        limit = min(limit, self.max_draft)
        if limit <= 0:
            return []
        if not output:  # a rewrite starts where its source starts
            return self.source[:limit]
        for n in range(min(self.max_ngram, len(output)), 0, -1):
            follows = self._index.get(tuple(output[-n:]))
            if follows:
                # Continue the current alignment where possible (a word the source repeats).
                start = next((p for p in follows if p >= self._cursor), follows[0])
                if start < len(self.source):
                    self._cursor = start
                    return self.source[start : start + limit]
        return []


class GreedyDecoder:
    """Greedy token generation for one `llama_cpp.Llama`, optionally speculative."""

    def __init__(self, llm: Any, stats: DecodeStats | None = None) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llm
        self.stats = stats or DecodeStats()
        self.n_batch = llm.n_batch
        self._n_vocab = llm.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._pieces: dict[int, bytes] = {}

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None

    def __del__(self) -> None:
        self.close()

    # -- tokens -----------------------------------------------------------------------------

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def piece(self, token: int) -> bytes:
        """The bytes of one token as `Llama.detokenize` renders it (special tokens as nothing)."""
        out = self._pieces.get(token)
        if out is None:
            buf = ctypes.create_string_buffer(64)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            out = self._pieces[token] = buf.raw[:n]
        return out

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompt: Sequence[int], max_tokens: int, drafter: Drafter | None = None) -> Iterator[int]:
        """Yield the greedy continuation of `prompt`: up to `max_tokens` tokens, the end-of-generation
        token included if reached (and last). The caller may stop early at any point."""
        llm = self.llm
        n_past = self._reuse_prefix(prompt)
        self.stats.reused += n_past
        pending = list(prompt[n_past:])
        output: list[int] = []
        while len(output) < max_tokens:
            room = min(max_tokens - len(output) - 1, llm.n_ctx() - n_past - len(pending) - 1, self.n_batch - 1)
            draft = drafter.propose(output, room) if drafter is not None else []
            best = self._decode(n_past, pending, draft)
            accepted = 0
            while accepted < len(draft) and best[accepted] == draft[accepted]:
                accepted += 1
            kept = pending + draft[:accepted]
            llm.input_ids[n_past : n_past + len(kept)] = kept
            n_past += len(kept)
            llm.n_tokens = n_past
            if accepted < len(draft):
                self._kv_remove(n_past)
            new = [*draft[:accepted], int(best[accepted])]
            self.stats.drafted += len(draft)
            self.stats.accepted += accepted
            self.stats.decodes += 1
            for token in new:
                output.append(token)
                self.stats.tokens += 1
                yield token
                if self.is_eog(token) or len(output) >= max_tokens:
                    return
            pending = [new[-1]]

    def _reuse_prefix(self, prompt: Sequence[int]) -> int:
        """Keep the cached tokens `prompt` starts with (at least its last token is re-evaluated
        for its logits); drop the rest from the KV cache. Returns how many are kept."""
        llm = self.llm
        limit = min(llm.n_tokens, len(prompt) - 1)
        same = np.asarray(prompt[:limit], dtype=np.intc) == llm.input_ids[:limit]
        keep = int(limit if same.all() else np.argmin(same))
        if not self._kv_remove(keep):
            keep = 0
            self._lib.llama_memory_clear(self._memory(), True)
        llm.n_tokens = keep
        return keep

    def _memory(self) -> Any:
        return self._lib.llama_get_memory(self.llm.ctx)

    def _kv_remove(self, start: int) -> bool:
        return bool(self._lib.llama_memory_seq_rm(self._memory(), 0, start, -1))

    def _decode(self, n_past: int, pending: list[int], draft: list[int]) -> np.ndarray:
        """Evaluate `pending` then `draft` from position `n_past`; return the argmax after the
        last pending token and after each drafted one (len(draft) + 1 tokens)."""
        tail = min(len(pending), self.n_batch - len(draft))
        head = len(pending) - tail
        for start in range(0, head, self.n_batch):  # a long prompt: no logits needed
            chunk = pending[start : min(head, start + self.n_batch)]
            self._run(n_past + start, chunk, logits_from=len(chunk))
        tokens = pending[head:] + draft
        self._run(n_past + head, tokens, logits_from=tail - 1)
        rows = len(draft) + 1
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self.llm.ctx), shape=(rows, self._n_vocab))
        return logits.argmax(axis=1)

    def _run(self, pos: int, tokens: list[int], logits_from: int) -> None:
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i >= logits_from
        status = self._lib.llama_decode(self.llm.ctx, batch)
        # Logits in the context are ours now: a later Llama.generate must not sample from them.
        self.llm._requires_eval = True
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")


class StopText:
    """Turns generated token bytes into text safe to stream: cut at the first stop string, holding
    back a tail that may start one and any incomplete UTF-8 character (as create_completion does)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s.encode("utf-8") for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self.raw = b""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        search_from = max(0, len(self.raw) - self._longest + 1)
        self.raw += piece
        hits = [i for i in (self.raw.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        return self._emit(_utf8_boundary(self.raw, len(self.raw) - self._partial_stop()))

    def flush(self) -> str:
        return self._emit(len(self.raw))

    def _partial_stop(self) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.raw)), best, -1):
                if self.raw.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _emit(self, end: int) -> str:
        end = max(end, self.sent)
        out = self.raw[self.sent : end].decode("utf-8", errors="ignore")
        self.sent = end
        return out


def _utf8_boundary(data: bytes, end: int) -> int:
    """`end`, moved back to the start of a UTF-8 character that is not complete before it."""
    for back in range(1, min(4, end) + 1):
        byte = data[end - back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back
            continue
        size = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return end - back if size > back else end
    return end
