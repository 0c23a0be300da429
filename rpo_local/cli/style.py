"""`rpo style`: per-profile style vectors (activation steering through llama.cpp's control vectors).

torch is imported only once a verb runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from rpo_local.cli._common import JsonOpt, ProfileOpt, note, open_store, print_json, profile_name
from rpo_local.errors import InputError
from rpo_local.extras import require

app = typer.Typer(help="Style vectors: personalization from the first texts, without training.", no_args_is_help=True)


@app.command("build")
def build(
    profile: ProfileOpt = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="GGUF reflection model [default: configured]")] = None,
    neutral: Annotated[str, typer.Option("--neutral", help="Neutral versions: 'rules' (instant) or 'paraphrase' (the base model's, cached with the training data's)")] = "rules",
    json_out: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr")] = False,
) -> None:
    """Build the profile's style vector from its texts and neutral versions of them.

    The vector is the per-block mean difference of the reflection model's hidden states on each
    text and on its neutral version, written as a llama.cpp control vector next to the profile's
    earlier versions. Prints its file.
    """
    require("train", "rpo style build", ("torch", "transformers"))
    from rpo_local import style
    from rpo_local.engine import open_engine

    if neutral not in style.NEUTRAL_SOURCES:
        raise InputError(f"--neutral must be one of {', '.join(style.NEUTRAL_SOURCES)}")
    name = profile_name(profile)
    store = open_store()
    store.get_profile(name)  # before the model loads
    engine = open_engine(model=model)
    say = (lambda _m: None) if quiet else note

    def on_progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            say(f"paraphrased {done}/{total} new texts")

    vector, timings = style.build_for_profile(store, name, engine, neutral=neutral, note=say, on_progress=on_progress)
    doc = {"profile": name, "path": str(vector.path), "pairs": vector.pairs, "bytes": vector.path.stat().st_size,
           "base_sha256": vector.base_sha256, "timings": timings}
    if json_out:
        print_json(doc)
    else:
        say(f"{vector.pairs} text pairs, {timings['total_s']:.1f} s; rewrites use it with --style "
            "(or `rpo config set style true`)")
        sys.stdout.write(f"{vector.path}\n")
