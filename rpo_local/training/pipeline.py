"""One training run end to end: data [-> RL rollouts] -> SFT -> GGUF export -> held-out evaluation -> register
-> activate only if it beats the adapter the profile uses now.

Activation is atomic: the adapter is exported to a temporary file, loaded in llama.cpp (which
is how it is evaluated), renamed to its final name, registered, and only then activated; the
previous adapter stays active until all of that succeeded. Each run is a row of `train_runs`.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rpo_local import devices, errors, paths, prompts
from rpo_local.adapters import resolve_adapter
from rpo_local.config import Config, load_config
from rpo_local.errors import InputError, ModelError, RpoError, TrainingBusy
from rpo_local.models import gguf_metadata
from rpo_local.names import file_stem
from rpo_local.training import dataset, rl
from rpo_local.training.due import MIN_ITEMS, training_due
from rpo_local.training.rl import RLConfig
from rpo_local.training.sft import SFTConfig

if TYPE_CHECKING:
    from rpo_local.engine import Engine
    from rpo_local.store import Store

Sink = Callable[[dict], None]


@dataclass
class Outcome:
    status: str  # activated | rejected | skipped | failed
    adapter: str | None
    reason: str
    figures: dict = field(default_factory=dict)
    run_id: int | None = None
    exit_code: int = 0  # the failure's RpoError exit code

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("run_id", "exit_code")}


# -- one run per profile at a time -----------------------------------------------------------

def lock_path(profile: str) -> Path:
    return paths.runs_dir() / f"{file_stem(profile)}.lock"


@contextmanager
def training_lock(profile: str) -> Iterator[None]:
    """Hold `profile`'s training lock, or raise TrainingBusy at once. The TUI, the daemon and
    cron all train through here, and a run's folder, checkpoint and paraphrase cache are per
    profile: two runs at once would write the same files. The OS releases the lock when its
    process dies (kill -9 included), so a crashed run never blocks the next."""
    from filelock import FileLock, Timeout

    path = lock_path(profile)
    paths.ensure_dir(path.parent)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise TrainingBusy(
            f"profile {profile!r} is being trained by another process (lock {path}); "
            "try again when that run has finished"
        ) from None
    try:
        yield
    finally:
        lock.release()


def rl_examples(engine: Engine, config: Config, current: Path | None, examples: list[dataset.Example],
                rl_cfg: RLConfig, note: Callable[[str], None]) -> tuple[list[dataset.Example], dict]:
    """The RL stage's training examples: the current model's best rewarded rollouts."""
    note(f"sampling {rl_cfg.samples} rewrites for each of {len(examples)} examples with the current model")
    engine.set_adapter(current)
    try:
        rolls = rl.rollouts(engine, examples, config, n=rl_cfg.samples, temperature=rl_cfg.temperature)
    finally:
        engine.set_adapter(None)
    kept = rl.select(rolls, rl_cfg.margin)
    figures = rl.summary(rolls, kept)
    note(f"{len(kept)} of {len(rolls)} examples have a rollout that beats the generic text")
    return kept, figures


# -- the run ----------------------------------------------------------------------------------

class Run:
    """A recorded training run for `profile`: a `train_runs` row, with the material it covers
    when it trains on the profile's own texts (see training.due)."""

    def __init__(self, store: Store, profile: str, kind: str, own_texts: bool) -> None:
        self.store = store
        marks = store.material_marks(profile) if own_texts else None
        self.id = store.start_train_run(profile, kind, marks)

    def finish(self, outcome: Outcome, error: str | None = None) -> Outcome:
        adapter_id = self.store.get_adapter(outcome.adapter)["id"] if outcome.adapter else None
        self.store.finish_train_run(self.id, outcome.status, adapter_id=adapter_id, summary=outcome.to_dict(),
                                    error=error)
        outcome.run_id = self.id
        return outcome


def score(engine: Engine, config: Config, adapter: Path | None, examples: list[dataset.Example]) -> dict:
    """ROUGE-1/L F of the reflection rewrite on held-out examples, with `adapter` switched in."""
    from rpo_local.evaluate import mean_rouge
    from rpo_local.reflect import Reflector

    engine.set_adapter(adapter)
    reflector = Reflector(None, engine, config)
    outputs, fallbacks = [], 0
    for ex in examples:
        chunk = reflector.rewrite_with_items(ex.generic, ex.context)
        outputs.append(chunk.output)
        fallbacks += chunk.fallback
    r1, rl = mean_rouge(outputs, [ex.target for ex in examples])
    return {"rouge1": round(r1, 4), "rougeL": round(rl, 4), "fallback_rate": round(fallbacks / len(examples), 3),
            "n": len(examples)}


def training_format(config: Config, current: Path | None) -> str:
    """The trajectory format a run teaches: the configured one, else (auto) the one of the
    adapter it continues from, so that what it learned keeps its shape."""
    if config.trajectory != "auto":
        return config.trajectory
    recorded = gguf_metadata(current).get("rpo.trajectory") if current else None
    return str(recorded) if recorded in prompts.FORMATS else prompts.DEFAULT_FORMAT


def _split(items: list, held_share: float = 0.15) -> tuple[list, list]:
    """(train, held-out): the newest texts are held out, as a new reply would be."""
    held = max(2, round(len(items) * held_share))
    return items[:-held], items[-held:]


def build_profile_data(store: Store, profile: str, engine: Engine, run_dir: Path, k: int,
                       note: Callable[[str], None], fmt: str) -> tuple[list, list]:
    targets = dataset.profile_targets(store, profile)
    if len(targets) < MIN_ITEMS:
        raise InputError(f"profile {profile!r} has {len(targets)} texts; training needs at least {MIN_ITEMS}")
    cache_path = run_dir.parent / f"paraphrases-{file_stem(profile)}.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    note(f"building {len(targets)} examples (the base model paraphrases each text once)")
    examples = dataset.profile_examples(store, profile, engine, targets, k=k, cache=cache, fmt=fmt)
    from rpo_local.fsutil import atomic_write_text

    atomic_write_text(cache_path, json.dumps(cache))
    return _split(examples)


def build_lamp_data(path: Path, users: int, run_dir: Path, template: str, k: int, fmt: str) -> tuple[list, list]:
    """Train on LaMP users after the first 100 (the eval users), hold out the last tenth."""
    from rpo_local.store import Store

    rows = dataset.read_lamp(path, skip=dataset.EVAL_USERS, limit=users)
    if len(rows) < 4:
        raise InputError(f"{path}: {len(rows)} users after the first {dataset.EVAL_USERS}; need at least 4")
    db = run_dir / "retrieval.db"
    db.unlink(missing_ok=True)
    with Store.open(db) as lamp_store:
        examples = dataset.lamp_examples(rows, lamp_store, template, k=k, fmt=fmt)
    if len(examples) < 4:
        raise InputError(f"{path}: {len(examples)} of {len(rows)} users' outputs rewrite their input; "
                         "need at least 4")
    held = max(2, len(examples) // 10)
    return examples[:-held], examples[-held:]


def run_sft(
    store: Store,
    profile: str,
    *,
    cfg: SFTConfig,
    lamp: Path | None = None,
    lamp_users: int = 200,
    start_from_current: bool = True,
    config: Config | None = None,
    on_step: Sink | None = None,
    progress: bool = True,
    note: Callable[[str], None] = lambda _m: None,
    engine: Engine | None = None,
    rl_cfg: RLConfig | None = None,
) -> Outcome:
    """Train, export, evaluate, register, and activate if better. A failure is an Outcome
    with status 'failed' (and a train_runs row); the one RpoError raised is TrainingBusy, when
    another process trains `profile` (then nothing is recorded or written).

    With `rl_cfg` the run is the RL stage: the examples' trajectories are the current model's
    own best-rewarded samples (`training.rl`) instead of the feature-built ones."""
    config = config or load_config()
    with training_lock(profile):
        return _recorded(store, profile, cfg, lamp, lamp_users, start_from_current, config, on_step,
                         progress, note, engine, rl_cfg)


def run_auto(
    store: Store,
    profile: str,
    *,
    cfg: SFTConfig,
    config: Config,
    on_step: Sink | None = None,
    note: Callable[[str], None] = lambda _m: None,
) -> Outcome:
    """`rpo train auto`: an SFT run when training.due says the profile is due, else 'skipped'.
    The rule is checked under the lock, so a run that just finished elsewhere counts."""
    with training_lock(profile):
        due = training_due(store, profile, config)
        if not due.due:
            return Outcome("skipped", None, due.reason)
        note(f"training: {due.reason}")
        return _recorded(store, profile, cfg=cfg, lamp=None, lamp_users=0, start_from_current=True, config=config,
                         on_step=on_step, progress=False, note=note, engine=None, rl_cfg=None)


def _recorded(store: Store, profile: str, cfg: SFTConfig, lamp: Path | None, lamp_users: int,
              start_from_current: bool, config: Config, on_step: Sink | None, progress: bool,
              note: Callable[[str], None], engine: Engine | None, rl_cfg: RLConfig | None) -> Outcome:
    """One run with its train_runs row; the caller holds the profile's lock."""
    run = Run(store, profile, "rl" if rl_cfg else "sft", own_texts=lamp is None)
    try:
        return run.finish(_run(store, profile, cfg, lamp, lamp_users, start_from_current, config, on_step,
                               progress, note, engine, run.id, rl_cfg))
    except RpoError as exc:
        return run.finish(Outcome("failed", None, exc.message, exit_code=exc.exit_code), error=exc.message)
    except BaseException as exc:  # Ctrl-C or a bug: the row must not stay "running"
        run.finish(Outcome("failed", None, errors.describe_error(exc)), error=traceback.format_exc())
        raise


def _run(store, profile, cfg, lamp, lamp_users, start_from_current, config, on_step, progress, note, engine,
         run_id, rl_cfg) -> Outcome:
    from rpo_local.engine import open_engine
    from rpo_local.models import sha256
    from rpo_local.training import export

    t0 = time.perf_counter()
    cfg.device = devices.torch_device(cfg.device, cpu_fallback=config.cpu_fallback, note=note)
    note(f"torch device: {cfg.device}")
    if lamp is None and store.count_items(profile) < MIN_ITEMS:  # before any model loads
        raise InputError(f"profile {profile!r} has {store.count_items(profile)} texts; "
                         f"training needs at least {MIN_ITEMS}")
    engine = engine or open_engine(config)
    model_path = engine.model_path
    kind = "rl" if rl_cfg else "sft"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    stem = file_stem(profile)  # never the raw name: it must not reach outside runs/ or adapters/
    name = f"{stem}-{kind}-{stamp}"
    # One working directory per profile, source and stage: an interrupted run's checkpoint is
    # found by the rerun (sft resumes only when data and settings are unchanged).
    run_dir = paths.ensure_dir(paths.runs_dir() / f"{stem}-{'lamp' if lamp else 'profile'}-{kind}")
    engine.set_adapter(None)  # paraphrases come from the bare base model
    current = resolve_adapter(store, profile, model_path)
    fmt = training_format(config, current if start_from_current else None)
    if lamp is not None:
        train_ex, held_ex = build_lamp_data(lamp, lamp_users, run_dir, engine.chat_template(), config.k, fmt)
    else:
        train_ex, held_ex = build_profile_data(store, profile, engine, run_dir, config.k, note, fmt)
    rollout_figures = None
    if rl_cfg is not None:
        train_ex, rollout_figures = rl_examples(engine, config, current, train_ex, rl_cfg, note)
        if not train_ex:
            return Outcome("rejected", None, "no sampled rewrite beat the generic text by the margin; "
                           "nothing to learn", {"rollouts": rollout_figures})
    dataset.write_jsonl(run_dir / "train.jsonl", train_ex)
    dataset.write_jsonl(run_dir / "heldout.jsonl", held_ex)

    if start_from_current and cfg.init_adapter is None and current is not None:
        cfg.init_adapter = str(current)  # per-user training starts from the adapter in use
    note(f"training on {len(train_ex)} examples, {len(held_ex)} held out"
         + (f", starting from {Path(cfg.init_adapter).name}" if cfg.init_adapter else ""))
    try:
        model, result = _fit(model_path, train_ex, run_dir, cfg, on_step, progress)
    except ModelError as exc:
        if not cfg.init_adapter:
            raise
        note(f"cannot start from {cfg.init_adapter} ({exc.message}); starting from scratch")
        cfg.init_adapter = None
        model, result = _fit(model_path, train_ex, run_dir, cfg, on_step, progress)

    final = paths.ensure_dir(paths.adapters_dir()) / f"{name}.lora.gguf"
    tmp = final.with_name(f".{final.name}.verify")
    export.export_gguf(model, tmp, meta={"profile": profile, "run": run_id, "trajectory": fmt,
                                         "base_sha256": sha256(model_path)})
    del model
    note("evaluating on held-out texts (current adapter vs the new one)")
    try:
        before = score(engine, config, current, held_ex)
        after = score(engine, config, tmp, held_ex)  # loads it in llama.cpp: the verification
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
        engine.set_adapter(None)
    figures = {"train": {k: v for k, v in result.to_dict().items() if k != "losses"},
               "heldout_before": before, "heldout_after": after,
               "current": str(current) if current else None, "wall_s": round(time.perf_counter() - t0, 1)}
    if rollout_figures:
        figures["rollouts"] = rollout_figures
    adapter_id = store.register_adapter(
        name, final, profile=profile, base_model=model_path.name, base_sha256=sha256(model_path),
        train_summary={"examples": len(train_ex), "heldout": len(held_ex), "source": str(lamp) if lamp else "profile",
                       "config": asdict(cfg), **figures["train"]},
        eval={"heldout_before": before, "heldout_after": after},
    )
    if after["rouge1"] > before["rouge1"]:
        store.set_active_adapter(profile, adapter_id)
        return Outcome("activated", name, f"held-out ROUGE-1 {before['rouge1']:.4f} -> {after['rouge1']:.4f}", figures)
    return Outcome("rejected", name, f"held-out ROUGE-1 {after['rouge1']:.4f} does not beat "
                   f"{before['rouge1']:.4f}; keeping the current adapter", figures)


def _fit(model_path: Path, train_ex: list, run_dir: Path, cfg: SFTConfig, on_step: Sink | None, progress: bool):
    """sft.train, with running out of GPU memory reported as such (exit 14), not as a bug."""
    from rpo_local.training import sft

    try:
        return sft.train(model_path, train_ex, run_dir, cfg, on_step=on_step, progress=progress)
    except RuntimeError as exc:
        if (gpu_error := devices.out_of_memory(exc, cfg.device)) is None:
            raise
        raise gpu_error from None
