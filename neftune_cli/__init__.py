"""neftune-cli: instruction fine-tuning with paper-faithful NEFTune noise."""

__version__ = "0.1.0"
