"""Token Filtering: online, calibration-free token pruning for Hugging Face decoder LLMs."""

__version__ = "0.1.0"
