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
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rpo_local import prompts
from rpo_local.training.dataset import Example, completion

if TYPE_CHECKING:
    from rpo_local.config import Config
    from rpo_local.engine import Engine

Reward = Callable[[str, str], float]


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
