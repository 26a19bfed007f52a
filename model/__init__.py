"""The GPT network and its attention backends."""
from model.gpt import GPT

__all__ = ["GPT"]
