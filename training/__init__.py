"""The run's library: what train_gpt.py and the tools share."""
