"""Inference, one job per module: loading any model artefact with the objective it was trained with
(checkpoints.py), generating class-conditional samples (generation.py), writing sample sets
(samples.py), and resumable sharded sampling (shards.py). Training (sample grids) and evaluation
both use it; it imports neither. This package re-exports nothing.
"""
