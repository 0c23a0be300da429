"""`rpo chat`: the terminal chat client (Textual is imported only when it runs)."""

from __future__ import annotations

from typing import Annotated

import typer

from rpo_local.cli._common import ProfileOpt, RetrieverOpt, note, with_retriever


def chat(
    profile: ProfileOpt = None,
    continue_: Annotated[
        bool, typer.Option("--continue", "-c", help="Resume the profile's latest conversation")
    ] = False,
    upstream: Annotated[
        str | None,
        typer.Option("--upstream", help="OpenAI-compatible base URL for the generic reply [default: configured, else the local model]"),
    ] = None,
    retriever: RetrieverOpt = None,
) -> None:
    """Chat in the terminal: each reply is personalized; accept, edit or reject it to teach rpo."""
    import sys

    from rpo_local.config import load_config
    from rpo_local.errors import InputError
    from rpo_local.store import Store

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise InputError("rpo chat needs an interactive terminal; use `rpo rewrite` in scripts")
    config = with_retriever(load_config(), retriever)
    name = config.profile if profile is None else profile
    from rpo_local.tui.app import ChatApp
    from rpo_local.tui.pipeline import ChatPipeline

    with Store.open() as store:
        if name not in {p["name"] for p in store.list_profiles()}:
            note(f"new profile {name!r}: add your writing with F3 (History) so replies sound like you")
        pipeline = ChatPipeline(store, config, name, upstream_url=upstream)
        if continue_ and pipeline.resume() is None:
            note(f"profile {name!r} has no saved conversation yet; starting a new one")
        ChatApp(pipeline).run()
