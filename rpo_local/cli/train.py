"""`rpo train`: fine-tune the reflection LoRA on a profile's own writing (or on LaMP users).

torch/transformers are imported only once a verb runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rpo_local.cli._common import JsonOpt, ProfileOpt, note, open_store, print_json, profile_name
from rpo_local.extras import require

if TYPE_CHECKING:
    from rpo_local.training.pipeline import Outcome
    from rpo_local.training.rl import RLConfig
    from rpo_local.training.sft import SFTConfig

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


def _progress_sink(enabled: bool) -> Callable[[dict], None] | None:
    if not enabled:
        return None

    def emit(event: dict) -> None:
        sys.stderr.write(json.dumps(event) + "\n")
        sys.stderr.flush()

    return emit


def _finish(outcome: Outcome, json_out: bool, progress_json: bool) -> None:
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


LampOpt = Annotated[Path | None, typer.Option("--lamp", help="Train on a LaMP JSONL file's users after the first 100")]
LampUsersOpt = Annotated[int, typer.Option("--lamp-users", min=4, help="LaMP users to use")]
StepsOpt = Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps (overrides --epochs)")]
EpochsOpt = Annotated[float, typer.Option("--epochs", min=0.01)]
RankOpt = Annotated[int, typer.Option("--rank", min=1)]
LrOpt = Annotated[float, typer.Option("--lr")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1)]
AccumOpt = Annotated[int, typer.Option("--grad-accum", min=1)]
TopLayersOpt = Annotated[int, typer.Option(
    "--top-layers", min=0,
    help="Train the LoRA of the top N blocks (0: all); an adapter continued from keeps its other blocks as they are")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=0, help="CPU threads (0: up to 2)")]
SeedOpt = Annotated[int, typer.Option("--seed")]
ScratchOpt = Annotated[bool, typer.Option("--from-scratch", help="Do not start from the adapter in use")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="Train on cpu, cuda, mps, or auto (torch's GPU when it sees one) [default: config device]")]


def _device(device: str | None) -> str:
    """--device, else the configured one; the training run resolves `auto` and checks that torch
    sees it (a failed run, exit 14, when it does not and cpu_fallback is off)."""
    from rpo_local.config import load_config
    from rpo_local.devices import check_device

    return check_device(device, "--device") or load_config().device


@app.command("sft")
def sft(
    profile: ProfileOpt = None,
    lamp: LampOpt = None,
    lamp_users: LampUsersOpt = 200,
    steps: StepsOpt = None,
    epochs: EpochsOpt = 1.0,
    rank: RankOpt = 8,
    lr: LrOpt = 1e-3,
    batch_size: BatchOpt = 4,
    grad_accum: AccumOpt = 1,
    top_layers: TopLayersOpt = 10,
    threads: ThreadsOpt = 0,
    seed: SeedOpt = 0,
    from_scratch: ScratchOpt = False,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
    progress_json: ProgressJsonOpt = False,
) -> None:
    """Build data, train, export, evaluate on held-out texts, register; activate if better."""
    require("train", "rpo train sft")
    from rpo_local.training.sft import SFTConfig

    cfg = SFTConfig(rank=rank, alpha=2.0 * rank, lr=lr, epochs=epochs, steps=steps, batch_size=batch_size,
                    grad_accum=grad_accum, top_layers=top_layers, threads=threads, seed=seed, device=_device(device))
    _train(profile, lamp, lamp_users, cfg, from_scratch, json_out, progress_json)


@app.command("rl")
def rl(
    profile: ProfileOpt = None,
    lamp: LampOpt = None,
    lamp_users: LampUsersOpt = 200,
    samples: Annotated[int, typer.Option("--samples", min=2, help="Rewrites sampled per example")] = 4,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature")] = 0.8,
    margin: Annotated[float, typer.Option("--margin", help="ROUGE-1 a kept sample must add over the generic text")] = 0.05,
    steps: StepsOpt = None,
    epochs: EpochsOpt = 2.0,
    lr: LrOpt = 5e-4,
    threads: ThreadsOpt = 0,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
    progress_json: ProgressJsonOpt = False,
) -> None:
    """The RL stage: sample rewrites with the adapter in use, reward them against your own
    texts, fine-tune on the best, evaluate on held-out texts; activate if better."""
    require("train", "rpo train rl")
    from rpo_local.training.rl import RLConfig
    from rpo_local.training.sft import SFTConfig

    cfg = SFTConfig(lr=lr, epochs=epochs, steps=steps, top_layers=10, grad_accum=1, threads=threads, seed=seed,
                    device=_device(device))
    _train(profile, lamp, lamp_users, cfg, False, json_out, progress_json,
           RLConfig(samples=samples, temperature=temperature, margin=margin))


def _train(profile: str | None, lamp: Path | None, lamp_users: int, cfg: SFTConfig, from_scratch: bool,
           json_out: bool, progress_json: bool, rl_cfg: RLConfig | None = None) -> None:
    from rpo_local.training.pipeline import run_sft

    name = profile_name(profile)
    with open_store() as store:
        if lamp is None:
            store.get_profile(name)
        else:
            store.ensure_profile(name)
        _interrupt_on_sigterm()
        outcome = run_sft(store, name, cfg=cfg, lamp=lamp, lamp_users=lamp_users, start_from_current=not from_scratch,
                          on_step=_progress_sink(progress_json), progress=not progress_json and not json_out,
                          note=note, rl_cfg=rl_cfg)
    _finish(outcome, json_out, progress_json)


@app.command("auto")
def auto(
    profile: ProfileOpt = None,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
    progress_json: ProgressJsonOpt = False,
) -> None:
    """Train if the profile is due: train_min_new_items new texts or rejected rewrites since its
    last run, and train_interval_hours passed (the daemon's rule too); else skip. With --json:
    one JSON object on stdout."""
    require("train", "rpo train auto")
    from rpo_local.config import load_config
    from rpo_local.training.pipeline import run_auto
    from rpo_local.training.sft import SFTConfig

    name = profile_name(profile)
    config = load_config()
    with open_store() as store:
        store.get_profile(name)
        _interrupt_on_sigterm()
        cfg = SFTConfig(top_layers=10, lr=1e-3, batch_size=4, grad_accum=1, threads=config.n_threads,
                        device=_device(device))
        outcome = run_auto(store, name, cfg=cfg, config=config, on_step=_progress_sink(progress_json), note=note)
    _finish(outcome, json_out, progress_json)


@app.command("runs")
def runs(profile: ProfileOpt = None, json_out: JsonOpt = False) -> None:
    """Past training runs of a profile, newest first."""
    with open_store() as store:
        name = profile_name(profile)
        store.get_profile(name)
        rows = store.list_train_runs(name)
    if json_out:
        print_json(rows)
        return
    for r in rows:
        error = (r["error"] or "").strip().splitlines()  # a bug's is a whole traceback: its last line
        print(f"{r['id']}\t{r['kind']}\t{r['status']}\t{r['started_at']}\t{error[-1] if error else ''}")
