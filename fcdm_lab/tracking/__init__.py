"""Experiment tracking with MLflow, one job per module:

- client.py: stores (URIs, probes), clients, runs (`tracked_run`, `Tracker`), the run pointer file;
- record.py: what every run records (tags, params, config.toml, model size, datasets);
- ui.py: browsing (the MLflow UI command, links, the closing "Browse:" line).

Import from the module that does the job; this package re-exports nothing.
"""
