"""``python -m easier_export``: the console entry point."""

from .launch import main

main()
