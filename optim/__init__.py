"""Optimizers for the run: Muon for hidden matrices, AdamW for the rest, and their schedules."""
