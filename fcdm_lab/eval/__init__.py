"""Evaluation, one job per module: metric names and rules (metrics.py), evaluating a model or a
checkpoint (evaluate.py), the paper's FID-50K protocol (protocol.py), torch-fidelity's metrics with
our feature extractors (fidelity.py), the per-dataset judge CNNs (classifier.py), sample files
(samples_io.py). Import from the module that does the job; this package re-exports nothing.
"""
