"""Experiments: what a run records for a results table (results.py), sweeps of runs (sweep.py), and the seed cards'
tables and plots over them (report.py, plots.py). `jaxchat sweep` and `jaxchat report` (commands.py)."""
