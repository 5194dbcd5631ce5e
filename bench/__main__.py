"""`python -m bench` is the `fedame-bench` command."""

from bench.cli import main

main()
