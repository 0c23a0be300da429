"""`rpo train`: fine-tune the reflection LoRA on a profile's own writing (or on LaMP users).

torch/transformers are imported only once a verb runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from rpo_local.cli._common import JsonOpt, ProfileOpt, note, open_store, print_json, profile_name

app = typer.Typer(help="Fine-tune the reflection model's LoRA adapter locally.", no_args_is_help=True)

ProgressJsonOpt = Annotated[
    bool, typer.Option("--progress-json", help="One JSON object per step on stderr (for the TUI and the daemon)")
]


def _interrupt_on_sigterm() -> None:
    """A daemon stops a run with SIGTERM: treat it like Ctrl-C, so the checkpoint is saved and
    the run is recorded as interrupted (rerunning resumes)."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _progress_sink(enabled: bool):  # noqa: ANN202 - a callable or None
    if not enabled:
        return None

    def emit(event: dict) -> None:
        sys.stderr.write(json.dumps(event) + "\n")
        sys.stderr.flush()

    return emit


def _finish(outcome, json_out: bool, progress_json: bool) -> None:  # noqa: ANN001 - pipeline.Outcome
    sink = _progress_sink(progress_json)
    if sink:
        sink({"event": "done", "status": outcome.status, "adapter": outcome.adapter, "reason": outcome.reason})
    if json_out:
        sys.stdout.write(json.dumps(outcome.to_dict(), default=str) + "\n")
        sys.stdout.flush()
    else:
        note(f"{outcome.status}: {outcome.reason}")
        if outcome.adapter:
            print(outcome.adapter)
    if outcome.status == "failed":
        raise typer.Exit(outcome.exit_code or 1)


@app.command("sft")
def sft(
    profile: ProfileOpt = None,
    lamp: Annotated[Path | None, typer.Option("--lamp", help="Train on a LaMP JSONL file's users after the first 100")] = None,
    lamp_users: Annotated[int, typer.Option("--lamp-users", min=4, help="LaMP users to use")] = 200,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps (overrides --epochs)")] = None,
    epochs: Annotated[float, typer.Option("--epochs", min=0.01)] = 1.0,
    rank: Annotated[int, typer.Option("--rank", min=1)] = 8,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1)] = 1,
    top_layers: Annotated[int, typer.Option("--top-layers", min=0, help="LoRA on the top N blocks (0: all)")] = 10,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads (0: up to 2)")] = 0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Do not start from the adapter in use")] = False,
    json_out: JsonOpt = False,
    progress_json: ProgressJsonOpt = False,
) -> None:
    """Build data, train, export, evaluate on held-out texts, register; activate if better."""
    from rpo_local.training.pipeline import run_sft
    from rpo_local.training.sft import SFTConfig

    name = profile_name(profile)
    cfg = SFTConfig(rank=rank, alpha=2.0 * rank, lr=lr, epochs=epochs, steps=steps, batch_size=batch_size,
                    grad_accum=grad_accum, top_layers=top_layers, threads=threads, seed=seed)
    with open_store() as store:
        if lamp is None:
            store.get_profile(name)
        else:
            store.ensure_profile(name)
        _interrupt_on_sigterm()
        outcome = run_sft(store, name, cfg=cfg, lamp=lamp, lamp_users=lamp_users, start_from_current=not from_scratch,
                          on_step=_progress_sink(progress_json), progress=not progress_json and not json_out, note=note)
    _finish(outcome, json_out, progress_json)


@app.command("auto")
def auto(
    profile: ProfileOpt = None,
    json_out: JsonOpt = False,
    progress_json: ProgressJsonOpt = False,
) -> None:
    """Train if the profile has enough new texts since its last run (train_min_new_items,
    train_interval_hours), else skip. With --json: one JSON object on stdout."""
    from rpo_local.config import load_config
    from rpo_local.training.pipeline import Outcome, run_sft, should_train
    from rpo_local.training.sft import SFTConfig

    name = profile_name(profile)
    config = load_config()
    with open_store() as store:
        store.get_profile(name)
        go, why = should_train(store, name, config)
        if not go:
            outcome = Outcome("skipped", None, why)
        else:
            _interrupt_on_sigterm()
            outcome = run_sft(store, name, cfg=SFTConfig(top_layers=10, lr=1e-3, batch_size=4, grad_accum=1),
                              config=config, on_step=_progress_sink(progress_json), progress=False, note=note)
    _finish(outcome, json_out, progress_json)


@app.command("runs")
def runs(profile: ProfileOpt = None, json_out: JsonOpt = False) -> None:
    """Past training runs of a profile, newest first."""
    with open_store() as store:
        pid = store.get_profile(profile_name(profile)).id
        rows = list(store.db.query(
            "select id, kind, status, started_at, finished_at, adapter_id, error from train_runs "
            "where profile_id = ? order by id desc", [pid]))
    if json_out:
        print_json(rows)
        return
    for r in rows:
        print(f"{r['id']}\t{r['kind']}\t{r['status']}\t{r['started_at']}\t{r['error'] or ''}")
