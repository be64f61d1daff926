"""`python -m ddpm_core generate …`: the same as the `ddpm` command."""

from ddpm_core.cli import main

main()
