"""Small verbs: paths, config, doctor, log, feedback."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rpo_local.cli._common import JsonOpt, ProfileOpt, err, note, open_store, print_json, profile_name

if TYPE_CHECKING:
    from rpo_local.config import Config

config_app = typer.Typer(help="Show and change configuration.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("paths")(paths)
    app.command("doctor")(doctor)
    app.command("log")(log)
    app.command("feedback")(feedback)
    app.add_typer(config_app, name="config")


def paths(json_out: JsonOpt = False) -> None:
    """Print where rpo-local keeps its database, config, adapters and cache."""
    from rpo_local.paths import all_paths

    items = {k: str(v) for k, v in all_paths().items()}
    if json_out:
        print_json(items)
    else:
        for key, value in items.items():
            print(f"{key}\t{value}")


@config_app.command("show")
def config_show(json_out: JsonOpt = False) -> None:
    """The effective configuration (defaults, file, RPO_* environment)."""
    from rpo_local.config import load_config

    values = load_config().to_dict()
    if json_out:
        print_json(values)
    else:
        for key, value in values.items():
            print(f"{key} = {'auto' if value is None else repr(value)}")  # None: the adapter decides


@config_app.command("set")
def config_set(key: str, value: str) -> None:
    """Persist KEY = VALUE in the config file."""
    from rpo_local.config import set_value

    set_value(key, value)
    note(f"{key} set")


def doctor(profile: ProfileOpt = None, json_out: JsonOpt = False) -> None:
    """Check the installation: backend, model, adapter, database."""
    from rpo_local import paths as p
    from rpo_local.config import load_config
    from rpo_local.errors import RpoError
    from rpo_local.models import resolve_model_path

    config = load_config()
    name = config.profile if profile is None else profile
    report: dict = {"profile": name, "problems": []}
    try:
        from rpo_local.engine import backend_name

        report["backend"] = backend_name()
    except (ImportError, OSError, RuntimeError) as exc:  # also a GPU build whose driver library is missing
        report["backend"] = None
        report["problems"].append(f"llama-cpp-python is not importable: {exc}")
    try:
        model = resolve_model_path(config.model or None)
        report["model"] = {"path": str(model), "bytes": model.stat().st_size}
    except RpoError as exc:
        report["model"] = None
        report["problems"].append(exc.message)
    report["database"] = {"path": str(p.db_path())}
    try:
        from rpo_local.adapters import resolve_adapter
        from rpo_local.scheduler import summary

        with open_store() as store:  # reads only: a profile that does not exist stays so
            report["database"]["read_only"] = store.read_only
            report["database"]["counts"] = store.counts()
            report["profile_exists"] = store.has_profile(name)
            adapter = resolve_adapter(store, name)
            report["adapter"] = str(adapter) if adapter else None
            runs = store.list_train_runs(name, limit=1)
            report["training"] = {k: runs[0][k] for k in ("kind", "status", "started_at", "finished_at")} if runs else None
            report["auto_training"] = summary(store, config, name) if report["profile_exists"] else None
    except RpoError as exc:
        report["problems"].append(exc.message)
    report["retrieval"] = _retrieval(config, name, report)
    if report.get("backend") is not None:
        report["gpu"] = _gpu(config, Path(report["model"]["path"]) if report.get("model") else None, report)
    if report.get("model"):
        from rpo_local.style import status as style_status

        report["style"] = style_status(config, name, model)
    if json_out:
        print_json(report)
    else:
        _print_report(report)
    if report["problems"]:
        raise typer.Exit(1)


def _retrieval(config: Config, profile: str, report: dict) -> dict:
    """The retriever, and for dense/hybrid whether it can run: the embedding model, its
    execution provider (CUDA or CPU), how much of the profile is embedded."""
    from rpo_local import embed
    from rpo_local.adapters import retriever
    from rpo_local.errors import RpoError

    info: dict = {"retriever": retriever(config, report.get("adapter")), "problem": embed.problem()}
    if info["problem"] is None:
        try:
            embedder = embed.get_embedder()
            info.update(model=embedder.model_id, query=embedder.query_variant, provider=embedder.provider)
            if report.get("profile_exists"):
                with open_store() as store:
                    pid = store.get_profile(profile).id
                    info["not_embedded"] = store.count_embedding_todo(pid, embedder.model_id)
        except RpoError as exc:
            info["problem"] = exc.message
    if config.retriever in ("dense", "hybrid") and info["problem"]:
        report["problems"].append(f"retriever {config.retriever!r} falls back to BM25: {info['problem']}")
    return info


def _gpu(config: Config, model: Path | None, report: dict) -> dict:
    """llama.cpp's devices, the gpu_layers setting and how many layers a load of the model
    really puts on the GPU (from llama.cpp's own log), and the training device."""
    from rpo_local import devices
    from rpo_local.engine import LlamaEngine
    from rpo_local.errors import RpoError

    info: dict = {"gpu_layers": config.gpu_layers, "cpu_fallback": config.cpu_fallback,
                  "training_device": config.device, "devices": devices.llama_devices(), "notes": []}
    if model is None:
        return info
    try:
        engine = LlamaEngine(model, n_ctx=64, speculative=False, gpu_layers=config.gpu_layers,
                             cpu_fallback=config.cpu_fallback, note=info["notes"].append)
    except RpoError as exc:
        report["problems"].append(exc.message)
        return info
    info.update(runs_on=engine.backend, offloaded_layers=engine.describe()["offloaded_layers"])
    engine.llm.close()
    return info


def _gpu_line(info: dict | None) -> str | None:
    if info is None:
        return None
    gpus = [d for d in info["devices"] if d["type"] in ("gpu", "igpu")]
    where = ", ".join(f"{d['name']} {d['description']} ({d['memory_free'] / 2**30:.1f} of "
                      f"{d['memory_total'] / 2**30:.1f} GiB free)" for d in gpus) or "no GPU device"
    placed = (f"{info['runs_on']}, layers on the GPU {info['offloaded_layers']}" if "runs_on" in info
              else "the model did not load (see the problem below)")
    notes = "".join(f"; note: {n}" for n in info["notes"])
    return f"{placed}; gpu_layers {info['gpu_layers']}; {where}; training device {info['training_device']}{notes}"


def _auto_training(info: dict | None) -> str | None:
    if not info:
        return None
    when = "interval passed" if info["interval_ok"] else f"not before {info['next_run_earliest']}"
    last = (info.get("last_run") or {}).get("status") or "no run yet"
    return f"{info['new_material']}/{info['needed']} new items, {when}; last scheduled run: {last}"


def _retrieval_line(info: dict) -> str:
    if info.get("problem"):
        return f"{info['retriever']} (dense: {info['problem']})"
    left = f", {info['not_embedded']} item(s) not embedded" if info.get("not_embedded") else ""
    query = f", queries in {info['query']}" if info.get("query") else ""
    return f"{info['retriever']} (dense: {info.get('model')} on {info.get('provider')}{query}{left})"


def _print_report(report: dict) -> None:
    model = report.get("model") or {}
    db = report.get("database") or {}
    exists = report.get("profile_exists")
    lines = [
        ("profile", report["profile"] + ("" if exists or exists is None else " (no history yet: not created)")),
        ("backend", report.get("backend")),
        ("gpu", _gpu_line(report.get("gpu"))),
        ("model", f"{model.get('path')} ({model.get('bytes', 0) / 1e6:.0f} MB)" if model else None),
        ("adapter", report.get("adapter") or "none"),
        ("database", f"{db.get('path')}{' (read-only)' if db.get('read_only') else ''}"),
        ("counts", ", ".join(f"{k} {v}" for k, v in (db.get("counts") or {}).items())),
        ("last training", report.get("training") or "never"),
        ("auto-training", _auto_training(report.get("auto_training"))),
        ("retrieval", _retrieval_line(report["retrieval"])),
        ("style vector", _style_line(report.get("style"))),
    ]
    for key, value in lines:
        print(f"{key:>14}: {value}")
    for problem in report["problems"]:
        err(f"problem: {problem}")


def _style_line(info: dict | None) -> str | None:
    if info is None:
        return None
    state = f"{'on' if info['enabled'] else 'off'} (scale {info['scale']}, blocks {info['layers']})"
    return f"{state}, {info['path'] or 'none built (`rpo style build`)'}"


def log(
    profile: ProfileOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 10,
    json_out: JsonOpt = False,
) -> None:
    """Recent rewrites of a profile (newest first)."""
    with open_store() as store:
        rows = store.list_interactions(profile_name(profile), limit=limit)
    if json_out:
        print_json(rows)
        return
    for row in rows:
        flag = "generic" if row["fallback"] else "rewritten"
        text = " ".join((row["rewrite"] or "").split())
        print(f"{row['id']}\t{flag}\t{row['latency_ms']:.0f} ms\t{text[:80]}")


def feedback(
    interaction_id: Annotated[int, typer.Argument(help="Interaction id (see `rpo log`)")],
    verdict: Annotated[str, typer.Argument(help="accepted, edited or rejected")],
    text: Annotated[str | None, typer.Option("--text", help="The edited text (for 'edited')")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Teach the model: accept, edit or reject a rewrite."""
    with open_store() as store:
        fid = store.add_feedback(interaction_id, verdict, text)
    note(f"feedback #{fid} recorded")
    if json_out:
        print_json({"feedback_id": fid, "interaction_id": interaction_id, "verdict": verdict})


