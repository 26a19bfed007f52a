"""Optimizers for the run: the one object the loop talks to (optimizer.py), Muon, NorMuon and DistAdam,
and their schedules."""
