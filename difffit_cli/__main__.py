"""`python -m difffit_cli` (and `accelerate launch -m difffit_cli ...`)."""

from difffit_cli.cli import main

main()
