"""The recipe: its typed schema (a leaf), loading and overrides, messages, the reference, checks, memory."""
