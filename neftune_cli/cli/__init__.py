"""The `neftune` command line: the typer app and exit codes, the data commands, the torchrun launcher."""
