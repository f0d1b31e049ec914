"""Plumbing every stage uses: atomic writes, safetensors, console, errors and exit codes, fault hooks."""
