"""Evaluation: the digits classifier, FID/KID/IS/precision-recall via torch-fidelity, sample files.

`compute_metrics` and the other torch-fidelity names load lazily: importing torch-fidelity costs
~2 s, which commands that never compute a metric should not pay.
"""
from fcdm_lab.eval.classifier import DigitsClassifier, class_consistency, get_digits_classifier
from fcdm_lab.eval.samples_io import load_samples, save_npz, save_png_folder, to_uint8

_LAZY = {"compute_metrics", "register_digits_extractor", "DigitsFeatureExtractor"}

__all__ = ["DigitsClassifier", "class_consistency", "get_digits_classifier", "load_samples", "save_npz",
           "save_png_folder", "to_uint8", *sorted(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        from fcdm_lab.eval import fidelity

        return getattr(fidelity, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
