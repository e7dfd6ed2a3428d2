"""`python -m difffit` (and `accelerate launch -m difffit ...`)."""

from difffit.cli import main

main()
