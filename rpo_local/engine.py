"""The inference engine: a GGUF model run by llama.cpp (llama-cpp-python).

`Engine` is the small interface the rest of the package uses (tests substitute a fake);
`LlamaEngine` implements it. llama_cpp is imported only when an engine is opened.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rpo_local import devices
from rpo_local.errors import GpuError, ModelError
from rpo_local.models import check_gguf, resolve_model_path

if TYPE_CHECKING:
    from rpo_local.config import Config
    from rpo_local.style import StyleVector


@dataclass
class Completion:
    """Filled in by `Engine.stream` as it runs; final once the iterator is exhausted."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (stop string or end of turn) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_s: float = 0.0  # time to the first generated token
    gen_s: float = 0.0  # time for the rest


class Engine(Protocol):
    model_path: Path
    adapter_path: Path | None
    style: StyleVector | None  # set with set_style
    n_ctx: int
    lock: threading.RLock  # held by a caller for a whole multi-step generation

    def chat_template(self) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int,
        stop: list[str],
        temperature: float = 0.0,
        seed: int = 0,
        result: Completion | None = None,
        draft: str | None = None,
    ) -> Iterator[str]:
        """Generate from `prompt`, yielding text pieces (the stop string excluded).

        `draft`: text the output is expected to copy much of (the reply being rewritten); greedy
        decoding then verifies tokens drafted from it in batches. The output is the same.
        """
        ...

    def set_adapter(self, path: Path | None, scale: float = 1.0) -> None: ...

    def set_style(self, vector: StyleVector | None, scale: float = 1.0, layers: tuple[int, int] = (1, 10_000)) -> None:
        """Steer generation with a style vector (`rpo_local.style`), next to the adapter; None: off."""
        ...

    def describe(self) -> dict: ...


def backend_name() -> str:
    """CUDA, Metal, Vulkan or CPU: what this llama.cpp build offloads to."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return "CPU"
    info = llama_cpp.llama_print_system_info().decode(errors="replace").upper()
    for name in ("CUDA", "METAL", "VULKAN", "HIP", "SYCL"):
        if name in info:
            return name.title() if name != "CUDA" else name
    return "GPU"


def batch_invariant() -> bool:
    """Does this llama.cpp build compute a token's logits bit for bit the same whether it is
    decoded alone or in a batch? Only then is speculative decoding exactly greedy decoding.

    On a CPU, llamafile's tinyBLAS (GGML_LLAMAFILE, on by default) takes the matrix products of
    batches of 2+ tokens and ggml's dot products single tokens; the sums round differently, the
    int8 re-quantization of activations amplifies that, and logits differ by up to ~1 (measured
    on SmolLM2-135M: the greedy token changed at 7% of positions). GPU kernels and ARM's int8
    matrix instructions also depend on the batch size.
    """
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return False
    info = llama_cpp.llama_print_system_info().decode(errors="replace").replace(" ", "").upper()
    return "LLAMAFILE=1" not in info and "MATMUL_INT8=1" not in info


_LOG_CALLBACK = None  # kept referenced: llama.cpp calls it for as long as the process lives
GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 4, 5  # ggml's enum since its DEBUG level came first
_last_offload: tuple[int, int] | None = None  # from the last load's log: (on the GPU, in all)


def quiet_llama_logs() -> None:
    """Let only llama.cpp's errors reach stderr. llama-cpp-python 0.3.36 maps ggml's log levels
    with the old enum (WARN read as ERROR), so its verbose=False still printed a warning per LoRA
    tensor ("cannot use buft 'CPU_REPACK'") on every rewrite with a Q4_K_M base."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    import sys

    import llama_cpp

    shown = [False]  # whether the message a CONT line continues was shown

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        global _last_offload
        if b"offloaded" in text:  # an info line, the only report of what went to the GPU
            _last_offload = devices.offloaded(text.decode(errors="replace")) or _last_offload
        if level != GGML_LOG_LEVEL_CONT:
            shown[0] = level == GGML_LOG_LEVEL_ERROR
        if shown[0]:
            print(text.decode("utf-8", errors="replace"), end="", flush=True, file=sys.stderr)

    _LOG_CALLBACK = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def default_threads() -> int:
    """Generation threads: llama-cpp-python's default (half the logical CPUs) leaves one of two
    cores idle on a small laptop (50 vs 76 tok/s measured on 2 cores); above four CPUs, half
    approximates the physical cores, where hyper-threads only slow llama.cpp down."""
    cpus = os.cpu_count() or 1
    return cpus if cpus <= 4 else cpus // 2


class LlamaEngine:
    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 2048,
        n_threads: int = 0,
        seed: int = 0,
        adapter_path: Path | None = None,
        speculative: bool = True,
        gpu_layers: str = "auto",
        cpu_fallback: bool = False,
        note: devices.Note = lambda _m: None,
    ) -> None:
        check_gguf(model_path)
        quiet_llama_logs()
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.lock = threading.RLock()
        self.backend = backend_name()
        self.gpu_layers = gpu_layers
        self.llm, layers = self._load(n_threads or default_threads(), seed, cpu_fallback, note)
        # llama.cpp's own count (it counts the output layer as one); none logged: nothing offloaded.
        self.offloaded: tuple[int, int] | None = _last_offload if layers else None
        if not layers or (self.offloaded and not self.offloaded[0]):
            self.backend = "CPU"  # a CPU build, or every layer kept on the CPU
        self.batch_invariant = batch_invariant()
        # Drafts are verified only where that gives exactly the greedy output (see batch_invariant).
        self.speculative = speculative and self.batch_invariant
        from rpo_local.speculative import DecodeStats, GreedyDecoder

        self.decode_stats = DecodeStats()
        self._decoder = GreedyDecoder(self.llm, self.decode_stats)
        self._adapters: dict[Path, object] = {}  # loaded once, kept for hot-swapping
        self.adapter_path: Path | None = None
        # The trajectory format the adapter was trained on; without one, a merged model's own
        # (`rpo quantize merge` copies the adapter's into the file).
        self.merged_format: str | None = self.llm.metadata.get("rpo.trajectory")
        self.adapter_format: str | None = self.merged_format
        self.style: StyleVector | None = None
        self.style_scale, self.style_layers = 1.0, (1, 10_000)
        if adapter_path is not None:
            self.set_adapter(adapter_path)

    def _load(self, n_threads: int, seed: int, cpu_fallback: bool, note: devices.Note) -> tuple[Any, int]:
        """(llama.cpp's model, the layers asked of the GPU). A load that fails with layers on the
        GPU is tried on the CPU: a failure there too is the model's (ModelError); else it was the
        GPU's, a GpuError unless cpu_fallback lets the CPU copy serve."""
        import llama_cpp

        def load(layers: int) -> Any:
            global _last_offload
            _last_offload = None
            return llama_cpp.Llama(model_path=str(self.model_path), n_ctx=self.n_ctx, n_gpu_layers=layers,
                                   n_threads=n_threads, seed=seed, verbose=False)

        layers = devices.offload_layers(self.gpu_layers, gpu_build=self.backend != "CPU",
                                        cpu_fallback=cpu_fallback, note=note)
        cpu_error = f"cannot load model {self.model_path}"
        try:
            return load(layers), layers
        except (ValueError, RuntimeError) as exc:
            if not layers:
                raise ModelError(f"{cpu_error}: {exc}") from None
            gpu_error = exc
        try:
            llm = load(0)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{cpu_error}: {exc}") from None
        try:
            devices.load_failed(gpu_error, self.backend, cpu_fallback, note)
        except GpuError:
            llm.close()
            raise
        return llm, 0

    def chat_template(self) -> str:
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelError(f"{self.model_path.name} has no chat template in its metadata")
        return template

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int,
        stop: list[str],
        temperature: float = 0.0,
        seed: int = 0,
        result: Completion | None = None,
        draft: str | None = None,
    ) -> Iterator[str]:
        result = result if result is not None else Completion()
        with self.lock:
            if temperature > 0:
                yield from self._sample(prompt, max_tokens, stop, temperature, seed, result)
            else:
                yield from self._greedy(prompt, max_tokens, stop, draft, result)

    def _greedy(self, prompt: str, max_tokens: int, stop: list[str], draft: str | None, result: Completion) -> Iterator[str]:
        """Greedy decoding on the batch API (speculative with a draft); the same text as
        `Llama.create_completion` at temperature 0, stop strings and end of turn included."""
        from rpo_local.speculative import Drafter, StopText

        decoder = self._decoder
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        if len(tokens) >= self.n_ctx:
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self.n_ctx}")
        max_tokens = min(max_tokens, self.n_ctx - len(tokens)) if max_tokens > 0 else self.n_ctx - len(tokens)
        source = self.llm.tokenize(draft.encode("utf-8"), add_bos=False, special=False) if draft else []
        text = StopText(stop)
        result.prompt_tokens = self.count_tokens(prompt)
        result.finish_reason = "length"
        start = time.perf_counter()
        first = None
        try:
            drafter = Drafter(source) if source and self.speculative else None
            for token in decoder.generate(tokens, max_tokens, drafter):
                first = first or time.perf_counter()
                if decoder.is_eog(token):
                    result.finish_reason = "stop"
                    break
                result.completion_tokens += 1
                piece = text.feed(decoder.piece(token))
                if piece:
                    result.text += piece
                    yield piece
                if text.stopped:
                    result.finish_reason = "stop"
                    return
            rest = text.flush()
            if rest:
                result.text += rest
                yield rest
        finally:  # also when the caller stops early (GeneratorExit)
            end = time.perf_counter()
            result.prompt_s = (first or end) - start
            result.gen_s = end - (first or end)

    def _sample(
        self, prompt: str, max_tokens: int, stop: list[str], temperature: float, seed: int, result: Completion
    ) -> Iterator[str]:
        """Sampling (training rollouts): llama-cpp-python's own completion loop."""
        result.prompt_tokens = self.count_tokens(prompt)
        start = time.perf_counter()
        first = None
        chunks = self.llm.create_completion(
            prompt, max_tokens=max_tokens, stop=stop, temperature=temperature, seed=seed, stream=True
        )
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                if first is None:
                    first = time.perf_counter()
                text = choice.get("text") or ""
                if text:
                    result.completion_tokens += 1
                    result.text += text
                    yield text
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
        finally:  # also when the caller stops early (GeneratorExit)
            end = time.perf_counter()
            result.prompt_s = (first or end) - start
            result.gen_s = end - (first or end)

    def set_adapter(self, path: Path | None, scale: float = 1.0) -> None:
        """Switch the LoRA adapter in place: the base model stays loaded."""
        from rpo_local import lora_runtime
        from rpo_local.adapters import check_base
        from rpo_local.models import gguf_metadata

        with self.lock:
            if path is not None:
                path = Path(path)
                if path not in self._adapters:
                    base = gguf_metadata(path).get("rpo.base_sha256")
                    check_base(path.name, str(base) if base else None, self.model_path)
                    self._adapters[path] = lora_runtime.load_adapter(self.llm, path)
                lora_runtime.apply_adapter(self.llm, self._adapters[path], scale)
                self.adapter_format = lora_runtime.adapter_meta(self._adapters[path], "rpo.trajectory")
            else:
                lora_runtime.apply_adapter(self.llm, None, 0.0)
                self.adapter_format = self.merged_format
            # The KV cache was computed with the old weights: drop it.
            self.llm.reset()
            self.adapter_path = path

    def set_style(self, vector: StyleVector | None, scale: float = 1.0, layers: tuple[int, int] = (1, 10_000)) -> None:
        """Add `vector` x `scale` to the residual stream after blocks `layers` (inclusive) as
        llama.cpp's control vector, together with the LoRA; None turns it off. In place: the
        model stays loaded."""
        import llama_cpp

        from rpo_local import style

        with self.lock:
            n_embd = self.llm.n_embd()
            if vector is None:
                status = llama_cpp.llama_set_adapter_cvec(self.llm.ctx, None, 0, n_embd, -1, -1)
            else:
                style.check(vector, self.model_path, n_embd)
                data = vector.data(scale, layers)
                status = llama_cpp.llama_set_adapter_cvec(
                    self.llm.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size, n_embd,
                    max(1, layers[0]), min(vector.n_layer - 1, layers[1]),
                )
            if status:
                raise ModelError(f"llama.cpp refused the style vector (status {status})")
            self.llm.reset()  # the KV cache was computed without it
            self.style, self.style_scale, self.style_layers = vector, scale, layers

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "gpu_layers": self.gpu_layers,
            "offloaded_layers": f"{self.offloaded[0]}/{self.offloaded[1]}" if self.offloaded else "0 (CPU)",
            "model": str(self.model_path),
            "model_bytes": self.model_path.stat().st_size,
            "adapter": str(self.adapter_path) if self.adapter_path else None,
            "style": str(self.style.path or "in memory") if self.style is not None else None,
            "n_ctx": self.n_ctx,
            "speculative": self.speculative,
        }


def open_engine(
    config: Config | None = None,
    *,
    model: str | Path | None = None,
    adapter: Path | None = None,
) -> Engine:
    """Load the configured (or given) GGUF model, with `adapter` applied if given."""
    from rpo_local.config import load_config

    config = config or load_config()
    path = resolve_model_path(model or config.model or None)
    return LlamaEngine(
        path, n_ctx=config.n_ctx, n_threads=config.n_threads, seed=config.seed, adapter_path=adapter,
        gpu_layers=config.gpu_layers, cpu_fallback=config.cpu_fallback, note=_stderr_note,
    )


def _stderr_note(message: str) -> None:
    import sys

    print(f"rpo: {message}", file=sys.stderr, flush=True)
