"""`rpo`: the command line, a thin layer over the rpo_local API.

Conventions: stdout carries only the result; notes, progress and trajectories go to stderr;
every listing has `--json`; each kind of failure has its own exit code (rpo_local.errors).
Heavy imports (llama_cpp, torch) happen inside the verbs that need them.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from rpo_local.cli import adapters as adapters_cli
from rpo_local.cli import chat, history, misc, rewrite
from rpo_local.cli import eval as eval_cli
from rpo_local.cli import models as models_cli
from rpo_local.cli import quantize as quantize_cli
from rpo_local.cli import serve as serve_cli
from rpo_local.cli import style as style_cli
from rpo_local.cli import train as train_cli
from rpo_local.errors import EXIT_INTERRUPTED, RpoError

app = typer.Typer(
    name="rpo",
    help="Personalize LLM replies offline: rewrite a generic reply in your own style.",
    no_args_is_help=True,
    add_completion=False,
    # Plain help text: rich markup would eat every "[default: ...]" in option help as a tag.
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("rewrite")(rewrite.rewrite)
app.command("serve")(serve_cli.serve)
app.command("chat")(chat.chat)
app.add_typer(history.app, name="history")
app.add_typer(history.profiles_app, name="profiles")
misc.register(app)
app.command("eval")(eval_cli.eval_cmd)
app.add_typer(train_cli.app, name="train")
app.add_typer(adapters_cli.app, name="adapters")
app.add_typer(style_cli.app, name="style")
app.add_typer(models_cli.app, name="models")
app.add_typer(quantize_cli.app, name="quantize")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps errors to exit codes, Ctrl-C to 130, a closed pipe to silence.
    Logged warnings and errors (a bug behind a fallback, with its traceback) go to stderr."""
    logging.basicConfig(format="rpo: %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="rpo", standalone_mode=False)
    except RpoError as exc:
        misc.err(f"Error: {exc.message}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's exit flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception as exc:
        sys.exit(_click_exit_code(exc))
    sys.exit(code if isinstance(code, int) else 0)


def _click_exit_code(exc: Exception) -> int:
    """Exit code for click's own exceptions (usage errors, aborts).

    Matched by behaviour rather than class: recent Typer vendors its own copy of click.
    """
    if isinstance(exc.__context__, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if hasattr(exc, "show") and hasattr(exc, "exit_code"):
        exc.show()
        return exc.exit_code
    if hasattr(exc, "exit_code"):
        return exc.exit_code
    raise exc
