"""The reinforcement-learning stage: reward-ranked fine-tuning of the reflection LoRA.

RPO's second stage improves the SFT model with a reward on its own rewrites. On a laptop CPU we
use the cheapest member of that family that is still on-policy, reward-ranked fine-tuning
(RAFT, Dong et al. 2023; ReST's "improve" step): for each training pair (generic g, the user's
text y, context), sample `n` trajectories from the current model through the product's own
Reflector (llama.cpp, loop cutting and content gate included), reward each answer with ROUGE-1
F against y, and keep the best trajectory only where it beats leaving g unchanged by `margin`.
Fine-tuning on the kept trajectories (the SFT code) is a policy-gradient step with a 0/1
advantage on the best of n: the model learns from its own analyses, where they paid off.
Rollouts run in llama.cpp, which samples ~5x faster than torch on a CPU; on a GPU,
`torch_rollouts` samples thousands of them at once in torch.

The paper's own RL stage is GRPO (Shao et al. 2024) with a progressive multi-context
curriculum: `grpo_update` is one policy-gradient pass with group-relative advantages and a KL
term to the SFT policy, over `sampled_rollouts`, whose prompts carry k = 1, 2, 4, 8 retrieved
items in successive rounds (`CURRICULUM`, `with_context`). train/rl_general_adapter.py
--method grpo runs it; the model card compares the two at equal rollouts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rpo_local import prompts
from rpo_local.training.dataset import Example, completion

if TYPE_CHECKING:
    from rpo_local.config import Config
    from rpo_local.engine import Engine

Reward = Callable[[str, str], float]
CURRICULUM = (1, 2, 4, 8)  # retrieved items in the prompt, one stage per round (the paper's curriculum)


@dataclass
class RLConfig:
    samples: int = 4  # rollouts per example
    temperature: float = 0.8
    margin: float = 0.05  # reward a kept rollout must add over leaving the generic text as it is


def rouge1_reward(answer: str, target: str) -> float:
    """ROUGE-1 F of `answer` against the user's own text (LaMP's metric)."""
    from rpo_local.evaluate import rouge

    return rouge(answer, target)[0]


@dataclass
class Sample:
    completion: str  # the trajectory as a training completion (after the prefix, end of turn included)
    answer: str
    reward: float
    fallback: bool


@dataclass
class Rollout:
    example: Example
    baseline: float  # the reward of keeping the generic text
    samples: list[Sample] = field(default_factory=list)

    @property
    def best(self) -> Sample | None:
        usable = [s for s in self.samples if not s.fallback]
        return max(usable, key=lambda s: s.reward) if usable else None

    def advantage(self) -> float:
        best = self.best
        return best.reward - self.baseline if best else 0.0


def sample_config(config: Config, temperature: float, seed: int) -> Config:
    return dataclasses.replace(config, temperature=temperature, seed=seed)


def rollouts(
    engine: Engine,
    examples: Sequence[Example],
    config: Config,
    *,
    n: int = 4,
    temperature: float = 0.8,
    reward: Reward = rouge1_reward,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Rollout]:
    """`n` sampled rewrites per example from the model as it is (adapter included), rewarded."""
    from rpo_local.reflect import Reflector

    reflectors = [Reflector(None, engine, sample_config(config, temperature, config.seed + i)) for i in range(n)]
    template = engine.chat_template()
    out = []
    for done, ex in enumerate(examples, start=1):
        roll = Rollout(ex, reward(ex.generic, ex.target))
        for reflector in reflectors:
            chunk = reflector.rewrite_with_items(ex.generic, ex.context, fmt=ex.fmt)
            t = chunk.trajectory
            turn = prompts.format_trajectory(t["style"], t["diff"], t["edits"], chunk.output, ex.fmt)
            roll.samples.append(Sample(completion(template, turn, ex.fmt), chunk.output,
                                       reward(chunk.output, ex.target), chunk.fallback))
        out.append(roll)
        if on_progress:
            on_progress(done, len(examples))
    return out


def torch_rollouts(
    model: Any,
    tok: Any,
    examples: Sequence[Example],
    template: str,
    *,
    n: int = 4,
    temperature: float = 0.8,
    min_kept: float = 0.8,
    max_new_tokens: int = 192,
    batch_size: int = 512,
    chunk: int = 1024,
    reward: Reward = rouge1_reward,
    deadline: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[Rollout]:
    """`rollouts` sampled in torch, `chunk` examples at a time, until `deadline` (a
    `time.monotonic()` value) if one is given. One generation per trajectory, where the
    runtime stops after the analysis and budgets the answer; the content gate (`min_kept`)
    is the runtime's: an answer it refuses is a fallback, as it would be in `rpo rewrite`."""
    from rpo_local.training.generate import generate

    out = []
    for start in range(0, len(examples), chunk):
        if deadline is not None and time.monotonic() > deadline:
            break
        part = examples[start:start + chunk]
        texts = generate(model, tok, [ex.prompt for ex in part], prompts.end_of_turn(template), n=n, temperature=temperature,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed + start,
                         progress=progress, desc=f"rollouts {start + len(part)}/{len(examples)}")
        for ex, raws in zip(part, texts, strict=True):
            baseline = reward(ex.generic, ex.target)
            out.append(Rollout(ex, baseline, [_sample(ex, raw, template, min_kept, reward, baseline)
                                              for raw in raws]))
    return out


def _sample(ex: Example, raw: str, template: str, min_kept: float, reward: Reward, baseline: float) -> Sample:
    """A generated trajectory as a Sample; what the gate refuses falls back to the generic text."""
    from rpo_local.reflect import keeps_content

    traj = prompts.parse_trajectory(prompts.assistant_prefix(ex.fmt) + raw)
    if traj.answer is None or not keeps_content(traj.answer, ex.generic, min_kept):
        return Sample(raw + prompts.end_of_turn(template), ex.generic, baseline, True)
    turn = prompts.format_trajectory(traj.style, traj.diff, traj.edits, traj.answer, ex.fmt)
    return Sample(completion(template, turn, ex.fmt), traj.answer, reward(traj.answer, ex.target), False)


def select(rolls: Sequence[Rollout], margin: float = 0.05) -> list[Example]:
    """Training examples from the rollouts whose best sample beats the generic text by `margin`."""
    return [dataclasses.replace(roll.example, completion=roll.best.completion)
            for roll in rolls if roll.best is not None and roll.advantage() >= margin]


def summary(rolls: Sequence[Rollout], kept: Sequence[Example]) -> dict:
    """Figures of a rollout round: how often sampling found a better rewrite than the generic text."""
    n = max(1, len(rolls))
    samples = [s for r in rolls for s in r.samples]
    return {
        "examples": len(rolls),
        "samples": len(samples),
        "kept": len(kept),
        "baseline_reward": round(sum(r.baseline for r in rolls) / n, 4),
        "best_reward": round(sum(r.best.reward if r.best else r.baseline for r in rolls) / n, 4),
        "fallback_share": round(sum(s.fallback for s in samples) / max(1, len(samples)), 3),
    }


# -- GRPO ----------------------------------------------------------------------------------------

@dataclass
class GRPOConfig:
    beta: float = 0.04  # weight of the KL term to the SFT policy (DeepSeekMath's value)
    lr: float = 1e-4
    batch_size: int = 4  # samples per micro-batch
    grad_accum: int = 2  # micro-batches per optimizer step
    max_len: int = 512  # longer samples are left out
    device: str = "cpu"


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """GRPO's advantages: each sample's reward against its group's (the same prompt's samples)
    mean, in units of the group's standard deviation. A group whose samples all score the same
    teaches nothing: all zero."""
    mean = sum(rewards) / len(rewards)
    std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
    return [(r - mean) / std if std > 1e-6 else 0.0 for r in rewards]


def with_context(ex: Example, k: int, template: str) -> Example:
    """`ex` prompted with only its first `k` retrieved items (a stage of the curriculum)."""
    context = ex.context[:k]
    return dataclasses.replace(ex, context=context,
                               prompt=prompts.reflection_prompt(template, ex.generic, context, ex.fmt))


def sampled_rollouts(
    engine: Engine,
    examples: Sequence[Example],
    template: str,
    *,
    n: int = 4,
    temperature: float = 0.8,
    min_kept: float = 0.8,
    max_tokens: int = 192,
    seed: int = 0,
    reward: Reward = rouge1_reward,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Rollout]:
    """`n` trajectories per example, each one llama.cpp generation (as `torch_rollouts` samples
    them in torch). A sample's completion is exactly the text sampled, a refused one included:
    a policy gradient needs the probability of what the policy did. Its reward is that of what
    `rpo rewrite` would print: the generic text's where the content gate refuses the answer."""
    from rpo_local.engine import Completion

    eot = prompts.end_of_turn(template)
    out = []
    for done, ex in enumerate(examples, start=1):
        roll = Rollout(ex, reward(ex.generic, ex.target))
        for i in range(n):
            result = Completion()
            raw = "".join(engine.stream(ex.prompt, max_tokens=max_tokens, stop=[eot], temperature=temperature,
                                        seed=seed + (done - 1) * n + i, result=result))
            sample = _sample(ex, raw, template, min_kept, reward, roll.baseline)
            ended = "" if result.finish_reason == "length" else eot
            roll.samples.append(dataclasses.replace(sample, completion=raw + ended))
        out.append(roll)
        if on_progress:
            on_progress(done, len(examples))
    return out


def grpo_rows(rolls: Sequence[Rollout]) -> list[tuple[Example, float]]:
    """(the sample as an example, its advantage) for every sample of a group that teaches something."""
    rows = []
    for roll in rolls:
        for sample, adv in zip(roll.samples, group_advantages([s.reward for s in roll.samples]), strict=True):
            if adv:
                rows.append((dataclasses.replace(roll.example, completion=sample.completion), adv))
    return rows


@contextmanager
def lora_weights(model: Any, state: dict) -> Iterator[None]:
    """`model` with the LoRA weights `state` for the block's duration, its own ones back after."""
    import torch

    params = dict(model.named_parameters())
    own = {name: params[name].detach().clone() for name in state}
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in own.items():
                params[name].copy_(value)


def grpo_update(model: Any, tok: Any, rolls: Sequence[Rollout], ref: dict, optim: Any, cfg: GRPOConfig) -> dict:
    """One GRPO pass over `rolls`: per sample, the mean over its tokens of
    -A * pi/pi_old + beta * KL(pi || pi_ref), KL by the k3 estimator exp(q) - q - 1 with
    q = log pi_ref - log pi. One update per batch of rollouts, so pi_old = pi: the ratio is 1
    and its gradient that of log pi. `ref` holds the SFT policy's LoRA weights. Dropout is off
    (the log-probabilities are the policy's, not a noisy copy's)."""
    import torch

    from rpo_local.training import sft

    rows, advs, skipped = [], [], 0
    for ex, adv in grpo_rows(rolls):
        encoded, too_long = sft.encode(tok, [ex], cfg.max_len)
        rows += encoded
        advs += [adv] * len(encoded)
        skipped += too_long
    if not rows:
        return {"samples": 0, "skipped_too_long": skipped, "steps": 0}
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plan = sft.batches(rows, cfg.batch_size, seed=len(rows))
    model.eval()
    with torch.no_grad(), lora_weights(model, ref):
        ref_logp = [sft.completion_logprobs(model, sft.collate(rows, idx, pad_id, cfg.device))[0] for idx in plan]
    params = [p for p in model.parameters() if p.requires_grad]
    t0, kls, losses = time.perf_counter(), [], []
    for start in range(0, len(plan), cfg.grad_accum):
        window = range(start, min(start + cfg.grad_accum, len(plan)))
        n_rows = sum(len(plan[b]) for b in window)
        for b in window:
            idx = plan[b]
            logp, row = sft.completion_logprobs(model, sft.collate(rows, idx, pad_id, cfg.device))
            adv = torch.tensor([advs[i] for i in idx], device=logp.device)[row]
            q = ref_logp[b] - logp
            kl = torch.exp(q) - q - 1
            per_token = -adv * torch.exp(logp - logp.detach()) + cfg.beta * kl
            tokens = torch.bincount(row, minlength=len(idx)).clamp(min=1)
            per_row = torch.zeros(len(idx), device=logp.device).index_add(0, row, per_token) / tokens
            loss = per_row.sum() / n_rows
            loss.backward()
            losses.append(loss.item())
            kls.append(float((torch.zeros(len(idx), device=logp.device).index_add(0, row, kl.detach()) / tokens).mean()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
    steps = -(-len(plan) // cfg.grad_accum)
    return {"samples": len(rows), "skipped_too_long": skipped, "steps": steps,
            "kl": round(sum(kls) / len(kls), 5), "loss_per_step": round(sum(losses) / steps, 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def grpo_optimizer(model: Any, cfg: GRPOConfig) -> Any:
    """AdamW over the learning LoRA weights, kept across rounds (its moments carry over)."""
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
