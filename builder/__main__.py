"""`python -m builder` is the `imc` command."""

from builder.cli import main

main()
