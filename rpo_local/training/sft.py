"""Supervised fine-tuning of the reflection model's LoRA (transformers + peft, CPU or GPU).

The base model is loaded from the same GGUF file llama.cpp runs (transformers dequantizes it);
its GGUF tokenizer matches llama.cpp token for token. The loss covers only the completion (the
trajectory and the end of turn). Micro-batches are padded dynamically to their longest row
(rows of similar length are batched together); gradients accumulate over `grad_accum`
micro-batches. A checkpoint is written every `checkpoint_every` steps and on Ctrl-C, and a
rerun with the same data and settings resumes from it. torch is imported only in here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rpo_local.errors import InputError, ModelError

if TYPE_CHECKING:
    from rpo_local.training.dataset import Example

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT = "checkpoint.pt"
StepSink = Callable[[dict], None]


@dataclass
class SFTConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ALL_LINEAR
    # Only the LoRA of the top `top_layers` blocks learns (0: all): backpropagation then stops
    # there, which makes a CPU step about twice as cheap and keeps activation memory small.
    top_layers: int = 0
    # Blocks that carry a LoRA (the top N, 0: all); None: the ones that learn. Continuing from an
    # adapter on more blocks, its LoRA below the learning blocks is applied but kept fixed.
    lora_layers: int | None = None
    lr: float = 3e-4
    epochs: float = 1.0
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 2  # micro-batches per optimizer step
    max_len: int = 512  # longer examples are left out (counted in the result)
    warmup: float = 0.06  # share of steps with a linear warm-up
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0: up to 2 (a laptop stays usable)
    device: str = "cpu"  # "cuda" or "mps" where torch has one
    checkpoint_every: int = 20
    init_adapter: str | None = None  # a GGUF adapter to start from (per-user training)

    def fingerprint(self, data_digest: str) -> str:
        keys = {k: v for k, v in asdict(self).items() if k not in ("threads", "device", "checkpoint_every")}
        return hashlib.sha256(json.dumps([keys, data_digest], sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    steps: int
    examples: int
    skipped_too_long: int
    tokens: int  # non-padding tokens processed (prompt + completion)
    seconds: float
    tokens_per_s: float
    s_per_step: float
    peak_rss_mb: float
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def load_base(model_path: Path, threads: int = 0, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) from the GGUF file llama.cpp runs, dequantized to fp32, on `device`.

    Converting a GGUF takes transformers 30-80 s on two cores (mostly reading the vocabulary
    and mapping tensor names), so the first conversion of each file is kept as safetensors in
    the cache, under its sha256; later loads read that in about a second, bit for bit the same.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_path = Path(model_path)
    converted = _converted_dir(model_path)
    if (converted / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(converted))
        model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    else:
        tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
        )
        _keep_converted(model, tok, converted)
    if device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 matmuls on a GPU
        model.to(device)
    return model, tok


def _converted_dir(model_path: Path) -> Path:
    from rpo_local import paths
    from rpo_local.models import sha256

    return paths.torch_models_dir() / sha256(model_path)


def _keep_converted(model: Any, tok: Any, folder: Path) -> None:
    """Save the conversion whole or not at all: written beside, then renamed into place. A
    failure (disk full, read-only cache, another process first) only costs the next load time."""
    import shutil

    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError as exc:
        if not (folder / "config.json").is_file():  # else another process saved it first
            print(f"rpo: not caching the converted model in {folder.parent}: {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_lora(model: Any, cfg: SFTConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    carry = cfg.top_layers if cfg.lora_layers is None else cfg.lora_layers
    lora = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
        layers_to_transform=_top_blocks(carry, n_layers), bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    learn = _top_blocks(cfg.top_layers, n_layers)
    if learn is not None:
        for name, param in model.named_parameters():
            block = _BLOCK.search(name)
            if param.requires_grad and block and int(block.group(1)) < learn[0]:
                param.requires_grad_(False)
    return model


def with_lora(model: Any, cfg: SFTConfig) -> tuple[Any, SFTConfig]:
    """`model` with the LoRA `cfg` describes: a fresh one, or `cfg.init_adapter` loaded (its
    shape then overrides `cfg`'s; the config actually used is returned)."""
    if not cfg.init_adapter:
        return add_lora(model, cfg), cfg
    from rpo_local.training.export import load_gguf_lora

    cfg = fit_to_adapter(cfg, model.config.num_hidden_layers)
    model = add_lora(model, cfg)
    load_gguf_lora(model, Path(cfg.init_adapter))
    return model, cfg


_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def _top_blocks(n: int, n_layers: int) -> list[int] | None:
    """The top `n` block indices; None for all of them (n = 0 or n >= n_layers)."""
    return list(range(n_layers - n, n_layers)) if 0 < n < n_layers else None


def fit_to_adapter(cfg: SFTConfig, n_layers: int) -> SFTConfig:
    """`cfg` with the rank, alpha and targets of the adapter it continues from, and a LoRA on
    its blocks too (a LoRA of another shape would silently leave part of that adapter behind);
    which blocks learn stays `cfg.top_layers`."""
    from rpo_local.training.export import adapter_layout

    alpha, rank, blocks, targets = adapter_layout(Path(cfg.init_adapter or ""))
    if blocks != list(range(blocks[0], n_layers)):
        raise ModelError(f"{cfg.init_adapter}: LoRA on blocks {blocks} is not on the top blocks of {n_layers}")
    top = n_layers - blocks[0]
    carry = 0 if top == n_layers or cfg.top_layers == 0 else max(top, cfg.top_layers)
    return replace(cfg, rank=rank, alpha=alpha, targets=targets, lora_layers=carry)


def encode(tok: Any, examples: Sequence[Example], max_len: int) -> tuple[list[tuple[list[int], int]], int]:
    """(ids, prompt_len) per example, as llama.cpp tokenizes them; and how many were too long."""
    rows, skipped = [], 0
    for ex in examples:
        prompt = tok(ex.prompt, add_special_tokens=False).input_ids
        completion = tok(ex.completion, add_special_tokens=False).input_ids
        if len(prompt) + len(completion) > max_len:
            skipped += 1
            continue
        rows.append((prompt + completion, len(prompt)))
    return rows, skipped


def batches(rows: list[tuple[list[int], int]], batch_size: int, seed: int) -> list[list[int]]:
    """Row indices per micro-batch: shuffled, then sorted by length within windows so that a
    batch pads little (dynamic padding), then the batches shuffled again."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    window = batch_size * 16
    out: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(rows[i][0]))
        out += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def collate(rows: list[tuple[list[int], int]], idx: list[int], pad_id: int, device: str = "cpu") -> dict:
    import torch

    width = max(len(rows[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for r, i in enumerate(idx):
        seq, plen = rows[i]
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, plen : len(seq)] = torch.tensor(seq[plen:])
        mask[r, : len(seq)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def completion_logprobs(model: Any, batch: dict) -> tuple[Any, Any]:
    """(log-probability of each completion token, flattened; the row each belongs to). The
    vocabulary projection runs only where there is a label: most positions are prompt, and the
    49k-wide logits dominate memory."""
    import torch

    base = model.get_base_model()
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    where = targets != -100
    logits = base.lm_head(hidden[:, :-1][where]).float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[where].unsqueeze(1)).squeeze(1)
    return logp, where.nonzero()[:, 0]


def completion_loss(model: Any, batch: dict) -> Any:
    """Summed cross-entropy over the completion tokens."""
    return -completion_logprobs(model, batch)[0].sum()


def data_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update((ex.prompt + "\x00" + ex.completion + "\x01").encode("utf-8"))
    return h.hexdigest()


def train(
    model_path: Path,
    examples: Sequence[Example],
    run_dir: Path,
    cfg: SFTConfig,
    *,
    on_step: StepSink | None = None,
    progress: bool = True,
    base: tuple[Any, Any] | None = None,
) -> tuple[Any, TrainResult]:
    """Fine-tune a LoRA on `examples`; return (peft model, figures). Resumes from run_dir."""
    import torch
    from tqdm import tqdm

    if not examples:
        raise InputError("no training examples")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, tok = base or load_base(model_path, cfg.threads, cfg.device)
    model, cfg = with_lora(model, cfg)
    rows, skipped = encode(tok, examples, cfg.max_len)
    if not rows:
        raise InputError(f"every example is longer than max_len={cfg.max_len} tokens")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = cfg.steps or max(1, math.ceil(per_epoch * cfg.epochs / cfg.grad_accum))
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total * cfg.grad_accum:  # as many epochs as the steps need
        plan += batches(rows, cfg.batch_size, cfg.seed + epoch)
        epoch += 1
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warm = max(1, round(total * cfg.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = cfg.fingerprint(data_digest(examples))
    losses: list[float] = []
    start_step = _resume(run_dir / CHECKPOINT, fingerprint, model, optim, sched, losses)
    model.train()
    tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=total, initial=start_step, desc="sft", unit="step", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    step = start_step
    try:
        for step in range(start_step, total):
            window = plan[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
            n_label = sum(len(rows[i][0]) - rows[i][1] for b in window for i in b)
            loss_sum = 0.0
            for idx in window:
                batch = collate(rows, idx, pad_id, cfg.device)
                loss = completion_loss(model, batch) / n_label
                loss.backward()
                loss_sum += loss.item()
                tokens += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            losses.append(round(loss_sum, 4))
            done = step + 1 - start_step
            eta = (time.perf_counter() - t0) / done * (total - step - 1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
            bar.update(1)
            if on_step:
                on_step({"event": "step", "step": step + 1, "total": total,
                         "loss": round(loss_sum, 4), "eta_s": round(eta, 1)})
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                _save(run_dir / CHECKPOINT, fingerprint, step + 1, model, optim, sched, losses)
    except KeyboardInterrupt:
        # Keep what was learned: a rerun resumes from here.
        _save(run_dir / CHECKPOINT, fingerprint, len(losses), model, optim, sched, losses)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    _save(run_dir / CHECKPOINT, fingerprint, total, model, optim, sched, losses)
    ran = max(1, total - start_step)
    result = TrainResult(
        steps=total, examples=len(rows), skipped_too_long=skipped, tokens=tokens,
        seconds=round(seconds, 2), tokens_per_s=round(tokens / seconds, 1) if seconds else 0.0,
        s_per_step=round(seconds / ran, 3), peak_rss_mb=round(peak_rss_mb(), 1),
        final_loss=losses[-1] if losses else None, losses=losses, resumed_from=start_step,
    )
    model.eval()
    return model, result


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024


def trainable_state(model: Any) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save(path: Path, fingerprint: str, step: int, model: Any, optim: Any, sched: Any, losses: list) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": fingerprint, "step": step, "lora": trainable_state(model),
                "optim": optim.state_dict(), "sched": sched.state_dict(), "losses": losses,
                "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def _resume(path: Path, fingerprint: str, model: Any, optim: Any, sched: Any, losses: list) -> int:
    """Load a matching checkpoint; return the step to continue from (0: start afresh)."""
    import torch

    if not path.is_file():
        return 0
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=False)
    if state.get("fingerprint") != fingerprint:
        return 0  # other data or settings: this run starts over
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["lora"].items():
            params[name].copy_(value)
    optim.load_state_dict(state["optim"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["rng"])
    losses[:] = state["losses"]
    return int(state["step"])
