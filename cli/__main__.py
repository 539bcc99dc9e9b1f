"""`python -m cli`: the same as the `esd` command."""

from cli.main import main

main()
