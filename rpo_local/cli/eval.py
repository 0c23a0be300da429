"""`rpo eval`: score personalization on LaMP, side by side with the baselines, in one run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rpo_local.cli._common import JsonOpt, RetrieverOpt, note, print_json, progress, with_retriever
from rpo_local.errors import EXIT_INTERRUPTED, InputError
from rpo_local.extras import require
from rpo_local.lamp import MAX_ANSWER_TOKENS

if TYPE_CHECKING:
    from rpo_local.engine import Engine
    from rpo_local.evaluate import EvalReport
    from rpo_local.lamp import LampData

ALL_METHODS = "copy,base,context,rpo,rpo+adapter"
STYLE_METHODS = "rpo+style,rpo+adapter+style"  # opt-in: they need the [train] extra (torch)


def eval_cmd(
    data: Annotated[Path | None, typer.Argument(help="LaMP JSONL (one user per line), or a questions JSON with --outputs")] = None,
    questions: Annotated[Path | None, typer.Option("--questions", help="LaMP questions JSON (two-file layout)")] = None,
    outputs: Annotated[Path | None, typer.Option("--outputs", help="LaMP outputs JSON with the golds (two-file layout)")] = None,
    task: Annotated[str | None, typer.Option("--task", help="LaMP task 4, 5 or 7 [default: from the file]")] = None,
    methods: Annotated[str | None, typer.Option("--methods", help=f"Comma-separated, any of {ALL_METHODS},{STYLE_METHODS} [default: all that can run but the style ones]")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="GGUF LoRA adapter (name, id or path) for rpo+adapter [default: the builtin one]")] = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Evaluate N users")] = None,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip the first N users")] = 0,
    k: Annotated[int | None, typer.Option("--k", "-k", min=0, help="Profile items retrieved [default: configured]")] = None,
    retriever: RetrieverOpt = None,
    rpo_input: Annotated[str | None, typer.Option("--rpo-input", help="What rpo rewrites: 'input' (LaMP-7's neutral text) or 'base' (the base answer)")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=8, help="Token limit of base and context answers")] = MAX_ANSWER_TOKENS,
    predictions_dir: Annotated[Path | None, typer.Option("--predictions-dir", help="Write <task>-<method>.json LaMP predictions files here")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a bar chart of the methods (PNG)")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Save each finished user here; rerunning with it resumes")] = None,
    replies: Annotated[bool, typer.Option("--replies", help="Whole replies built from LaMP-7 users (rpo_local/replies.py)")] = False,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="GGUF model [default: the embedded one]")] = None,
    json_out: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr")] = False,
) -> None:
    """Evaluate copy, base, context, rpo and rpo+adapter on LaMP (ROUGE-1/ROUGE-L, mean over users).

    The Markdown table (or with --json one JSON document) goes to stdout. Ctrl-C stops the run and still writes what was finished, marked partial.
    """
    require("eval", "rpo eval")
    if plot is not None:
        require("eval", "rpo eval --plot", ("matplotlib",))
    from rpo_local import evaluate, lamp
    from rpo_local.config import load_config

    dataset = lamp.load(data, questions=questions, outputs=outputs, task=task)
    adapter_path = _adapter_path(adapter, model)
    method_list = evaluate.parse_methods(methods or _default_methods(adapter_path, replies))
    if not any("+adapter" in m for m in method_list):
        adapter_path = None
    if any(m.endswith("+style") for m in method_list):
        require("train", "rpo eval's style methods", ("torch", "transformers"))
    users = lamp.select(dataset.users, offset=offset, limit=limit)
    if not users:
        raise InputError(f"{dataset.source}: no users left after --offset {offset}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise InputError(f"--plot {plot}: the chart is written as PNG; give a .png file name")
    if replies and dataset.task != "LaMP_7":
        raise InputError(f"--replies builds on LaMP-7 tweets; {dataset.source} holds {dataset.task}")
    method_list, rpo_input = evaluate.check_options(
        "LaMP_7_replies" if replies else dataset.task, method_list, adapter=adapter_path, rpo_input=rpo_input,
        k=0 if k is None else k,
    )
    needs_model = set(method_list) - {"copy"} or rpo_input == "base" or replies
    engine = _open_engine(model) if needs_model else _NoEngine()
    if replies:
        dataset, offset, limit = _build_replies(dataset, engine, offset, limit, len(users), quiet), 0, None
        users = dataset.users
    if not quiet:
        note(f"{dataset.task}: {len(users)} users, methods {', '.join(method_list)}")
    interrupted = False
    with progress(len(users), quiet, "eval", "users") as on_progress:
        try:
            report = evaluate.run_eval(
                dataset, engine, methods=method_list, adapter=adapter_path, k=k, offset=offset, limit=limit,
                rpo_input=rpo_input, max_tokens=max_tokens, on_progress=on_progress, checkpoint=checkpoint,
                config=with_retriever(load_config(), retriever),
            )
        except evaluate.EvalInterrupted as exc:
            report, interrupted = exc.report, True
    _write_outputs(report, predictions_dir, plot, json_out, quiet)
    if interrupted:
        note(f"interrupted: results cover {report.completed} of {report.selected} users (partial)")
        raise typer.Exit(EXIT_INTERRUPTED)


def _adapter_path(adapter: str | None, model: Path | None) -> Path | None:
    """The adapter for rpo+adapter: --adapter (a file, or a name/id registered in the store), else
    the builtin one for the model evaluated."""
    from rpo_local.adapters import adapter_from_ref, builtin_adapter_path
    from rpo_local.models import resolve_model_path

    if adapter is not None:
        return adapter_from_ref(adapter)
    return builtin_adapter_path(resolve_model_path(model) if model else None)


def _default_methods(adapter: Path | None, replies: bool = False) -> str:
    methods = ALL_METHODS.replace("base,context,", "") if replies else ALL_METHODS
    return methods if adapter is not None else methods.replace(",rpo+adapter", "")


def _build_replies(dataset: LampData, engine: Engine, offset: int, limit: int | None, total: int,
                   quiet: bool) -> LampData:
    """The replies task for the selected users (their tweets' paraphrases come from the cache or
    are made now by the base model)."""
    from rpo_local import replies

    if not quiet:
        note(f"building replies from LaMP-7 users (paraphrases cached in {replies.cache_path(engine)})")
    with progress(total, quiet, "eval", "users") as on_progress:
        built = replies.build(dataset, engine, offset=offset, limit=limit, on_progress=on_progress)
    if not built.users:
        raise InputError(f"{dataset.source}: no user has enough usable tweets for a reply")
    if not quiet:
        note(f"{len(built.users)} users have enough usable tweets")
    return built



def _open_engine(model: Path | None) -> Engine:
    from rpo_local.engine import open_engine

    return open_engine(model=model)


class _NoEngine:
    """Stands in for the model when only `copy` runs (it needs none)."""

    model_path = Path("none")
    adapter_path = None


def _write_outputs(report: EvalReport, predictions_dir: Path | None, plot: Path | None, json_out: bool, quiet: bool) -> None:
    doc = report.to_dict(per_user=json_out)
    if predictions_dir is not None:
        written = report.write_predictions(predictions_dir)
        doc["predictions"] = {m: str(p) for m, p in written.items()}
        if not quiet:
            note(f"predictions written to {predictions_dir}")
    if plot is not None:
        report.plot(plot)
        doc["plot"] = str(plot)
        if not quiet:
            note(f"chart written to {plot}")
    if json_out:
        print_json(doc)
    else:
        sys.stdout.write(report.markdown() + "\n")
        sys.stdout.flush()
