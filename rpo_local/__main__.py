"""`python -m rpo_local` runs the CLI (used to start background training runs)."""

from rpo_local.cli import main

main()
