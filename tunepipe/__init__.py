"""tunepipe: a reproducible LLM fine-tuning pipeline built from DVC stages.

Stage scripts live in ``stages/``; this package holds the focused modules they share.
"""

__version__ = "0.1.0"
