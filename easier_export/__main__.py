"""``python -m easier_export``: the console entry point."""

from easier_export.cli.launch import main

main()
