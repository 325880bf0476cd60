"""`python -m gemmtune.cli`: the same as the `gemmtune` executable."""

from gemmtune.cli import main

main()
