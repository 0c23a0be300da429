"""`rpo serve`: the personalizing OpenAI-compatible proxy on localhost (see rpo_local.server)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rpo_local.cli._common import ProfileOpt, RetrieverOpt, note, use_color, with_retriever
from rpo_local.config import Config

if TYPE_CHECKING:
    from rpo_local.embed import Backfill
    from rpo_local.store import Store


def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback unless --allow-remote)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on")] = 8765,
    upstream: Annotated[str | None, typer.Option("--upstream", help="OpenAI-compatible base URL [default: configured, else the local model]")] = None,
    upstream_model: Annotated[str | None, typer.Option("--upstream-model", help="Model to ask the upstream for")] = None,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a non-loopback --host (warns)")] = False,
    allow_host: Annotated[list[str] | None, typer.Option("--allow-host", help="Extra Host header name to accept (repeatable)")] = None,
    profile: ProfileOpt = None,
    retriever: RetrieverOpt = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="GGUF reflection model")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.1, help=f"Rewrite time budget, s (config rewrite_timeout_s; default {Config.rewrite_timeout_s:g})")] = None,
    upstream_timeout: Annotated[float | None, typer.Option("--upstream-timeout", min=0.1, help=f"Wait this long for a remote upstream, then 504, s (config upstream_timeout_s; default {Config.upstream_timeout_s:g})")] = None,
    max_queued: Annotated[int | None, typer.Option("--max-queued", min=1, max=100_000, help=f"Rewrites that may wait for the worker, then 503 (config max_queued_requests; default {Config.max_queued_requests})")] = None,
    max_body: Annotated[int, typer.Option("--max-body", min=1024, help="Largest request body in bytes (413 above)")] = 1_000_000,
    train: Annotated[bool, typer.Option("--train/--no-train", help="Fine-tune periodically in the background")] = True,
    train_check: Annotated[float, typer.Option("--train-check", min=1.0, help="Seconds between checks for new material")] = 60.0,
    train_device: Annotated[str | None, typer.Option("--train-device", help="Background training on cpu, cuda, mps or auto [default: config device]")] = None,
) -> None:
    """Serve an OpenAI-compatible API that personalizes every reply: point clients at http://HOST:PORT/v1.

    When RPO_API_KEY is set, requests must carry it as a bearer token. The upstream's key comes from RPO_UPSTREAM_API_KEY or OPENAI_API_KEY.
    """
    from rpo_local import server as srv
    from rpo_local.adapters import resolve_adapter
    from rpo_local.config import load_config
    from rpo_local.devices import check_device
    from rpo_local.engine import open_engine
    from rpo_local.scheduler import TrainScheduler
    from rpo_local.store import Store
    from rpo_local.upstream import open_upstream

    config = with_retriever(load_config(), retriever)
    config.profile = config.profile if profile is None else profile
    config.upstream_model = upstream_model or config.upstream_model
    config.rewrite_timeout_s = timeout or config.rewrite_timeout_s
    config.upstream_timeout_s = upstream_timeout or config.upstream_timeout_s
    config.max_queued_requests = max_queued or config.max_queued_requests
    config.device = check_device(train_device, "--train-device") or config.device
    srv.check_host(host, allow_remote)
    sock = srv.bind(host, port)  # a busy port fails before the models load
    store = Store.open()
    store.check_writable()  # every request records its interaction
    store.ensure_profile(config.profile)
    note("loading the reflection model")
    engine = open_engine(config, model=model, adapter=resolve_adapter(store, config.profile))
    up = open_upstream(config, url=upstream, engine_factory=lambda c: open_engine(c, model=model))
    extra_hosts = tuple(allow_host or ()) + (() if srv.is_loopback(host) or host in ("0.0.0.0", "::") else (host,))
    daemon = srv.Daemon(
        store=store, engine=engine, upstream=up, config=config, api_key=os.environ.get("RPO_API_KEY"),
        allowed_hosts=extra_hosts, max_body_bytes=max_body,
    )
    if train:
        daemon.scheduler = TrainScheduler(store, config, switch=daemon.worker.switch_adapter, check_s=train_check)
    daemon.backfill = _backfill(store, config, train_check)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    note(f"serving http://{shown}:{bound}/v1 (profile {config.profile}, adapter "
         f"{daemon.adapter_label(engine.adapter_path) or 'none'}, upstream {up.name}, "
         f"training {'on' if train else 'off'}); Ctrl-C stops")
    srv.run(srv.create_app(daemon), sock, use_colors=use_color())


def _backfill(store: Store, config: Config, check_s: float) -> Backfill | None:
    """For dense/hybrid retrieval: new items embedded in the background (none when it cannot run:
    retrieval then says why, once, and uses BM25)."""
    from rpo_local import embed

    if config.retriever == "bm25" or embed.problem() is not None:
        return None
    return embed.Backfill(store, check_s=check_s)
