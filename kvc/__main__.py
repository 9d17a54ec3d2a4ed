"""`python -m kvc` is the `kvc` command."""

from kvc.cli import main

main()
