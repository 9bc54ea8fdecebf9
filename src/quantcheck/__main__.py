"""`python -m quantcheck`: the same as the `quantcheck` command."""

from quantcheck.cli import main

main()
