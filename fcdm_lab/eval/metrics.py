"""Metric names, which features judge them, which direction is better, and the reference sets:
pure names and rules (no torch, no torch-fidelity), shared by evaluation, studies, sweeps and reports.

Metric names say which features judged them (proxy metrics must never pass for FID-50K):
  fid_digits, kid_digits, is_digits, precision_digits, recall_digits   the digits CNN's features
  class_acc_digits                                                     share of samples the digits
                                                                       classifier labels as their class
  fid_fashion, ..., class_acc_fashion                                  the same with the Fashion-MNIST CNN
  fid_inception, kid_inception, is_inception, precision_inception, recall_inception
                                                                       Inception-v3; the result key
                                                                       carries the sample count
                                                                       (fid_inception_5k)
  val_loss, val_mse, val_vb, val_loss_q1..q4                           the training objective's loss on
                                                                       the held-out split (eval/heldout.py)
Short names (fid, kid, is, prc) pick the digits CNN for digits data, the Fashion-MNIST CNN for
fashion-mnist and Inception otherwise.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Iterable, List

from ..errors import UserError, choices

DIGITS_REFERENCES = {"digits-train": "train", "digits-test": "test"}
FASHION_REFERENCES = {"fashion-train": "train", "fashion-test": "test"}
REFERENCES = (*DIGITS_REFERENCES, *FASHION_REFERENCES)
ISC_SPLITS = 10  # Inception Score splits: the fewest samples it needs

FEATURE_METRICS = {"fid": "fid", "kid": "kid", "is": "is", "precision": "prc", "recall": "prc"}
EXTRACTOR_TAGS = ("digits", "inception", "fashion")
CLASS_ACC = "class_acc_digits"
CLASSIFIER_DATA = {"digits": "digits", "fashion": "fashion-mnist"}  # our CNN judges -> the data they judge
CLASS_ACCS = {f"class_acc_{tag}": tag for tag in CLASSIFIER_DATA}
# The training objective's loss on the held-out split, computed from the model (eval/heldout.py), never
# from samples: evaluation routes these names away from torch-fidelity (plan_metrics' "heldout").
HELDOUT_METRICS = ("val_loss", "val_mse", "val_vb", "val_loss_q1", "val_loss_q2", "val_loss_q3", "val_loss_q4")
METRIC_NAMES = tuple([f"{m}_{tag}" for tag in EXTRACTOR_TAGS for m in FEATURE_METRICS] + list(CLASS_ACCS)
                     + list(HELDOUT_METRICS))
INCEPTION_METRICS = tuple(f"{m}_inception" for m in FEATURE_METRICS)


def is_heldout_metric(name: str) -> bool:
    """A held-out loss metric (val_loss, ...): computed by eval/heldout.py, not from samples."""
    return name in HELDOUT_METRICS


def check_metric_names(names: Iterable[str]) -> List[str]:
    names = list(names)
    if not names:
        raise UserError(f"no metrics requested; valid: {choices(METRIC_NAMES)}")
    bad = [n for n in names if n not in METRIC_NAMES]
    if bad:
        raise UserError(f"unknown metric {bad[0]!r}; valid: {choices(METRIC_NAMES)}")
    return names


def expand_metric_names(names: Iterable[str], data_name: str) -> List[str]:
    """Short names as torch-fidelity calls them ("fid", "kid", "is", "prc") -> the judged names:
    the dataset's own CNN for digits / fashion-mnist data, Inception otherwise. Full names pass through."""
    tag = next((t for t, data in CLASSIFIER_DATA.items() if data == data_name), "inception")
    out: List[str] = []
    for name in names:
        short = {"prc": ["precision", "recall"]}.get(name, [name] if name in FEATURE_METRICS else None)
        for n in ([f"{m}_{tag}" for m in short] if short else [name]):
            if n not in out:
                out.append(n)
    return out


def plan_metrics(names: Iterable[str]) -> Dict[str, Any]:
    """{"digits": torch-fidelity metrics for the digits CNN, "fashion": ..., "inception": ...,
    "labels": the CNN judging class consistency ("digits" | "fashion") or False,
    "heldout": held-out loss names (eval/heldout.py computes them; nothing is sampled for them)}."""
    plan: Dict[str, Any] = {"digits": [], "fashion": [], "inception": [], "labels": False, "heldout": []}
    for name in check_metric_names(names):
        if is_heldout_metric(name):
            plan["heldout"].append(name)
            continue
        if name in CLASS_ACCS:
            if plan["labels"] and plan["labels"] != CLASS_ACCS[name]:
                raise UserError("class_acc_digits and class_acc_fashion judge different data; ask for one")
            plan["labels"] = CLASS_ACCS[name]
            continue
        metric, tag = name.rsplit("_", 1)
        fid_name = FEATURE_METRICS[metric]
        if fid_name not in plan[tag]:
            plan[tag].append(fid_name)
    return plan


def result_key_matches(requested: str, key: str) -> bool:
    """Does a result key answer a requested metric? 'fid_inception' -> 'fid_inception_5k'
    (the sample count is added to Inception metrics); '_std' companions do not count."""
    if key.endswith("_std"):
        return False
    return key == requested or (requested.endswith("_inception") and key.startswith(requested + "_"))


def metric_key(requested: str, keys: Iterable[str]) -> str | None:
    """The result key among `keys` that answers `requested` (None if absent)."""
    return next((k for k in sorted(keys) if result_key_matches(requested, k)), None)


def default_reference(cfg) -> str:
    """The real images to compare with when none is given: the training split for digits / fashion-mnist."""
    if cfg.data.name == "digits":
        return "digits-train"
    if cfg.data.name == "fashion-mnist":
        return "fashion-train"
    raise UserError(f"give a reference set for data {cfg.data.name!r} (--reference / eval.reference): a folder "
                    f"of PNGs or an ADM .npz of real images; 'digits-train' and 'digits-test' serve digits data")


def reference_for(cfg):
    """The reference set an evaluation of `cfg` scores against: eval.reference, else the default."""
    return cfg.eval.reference or default_reference(cfg)


def check_metrics_for(metrics: Iterable[str], data_name: str) -> List[str]:
    """The metric names an evaluation of `data_name` data will compute (short names expanded), or a
    one-line UserError: an unknown name, or a dataset CNN's metric on other data."""
    names = check_metric_names(expand_metric_names(metrics, data_name))
    plan = plan_metrics(names)
    for tag, data in CLASSIFIER_DATA.items():
        if (plan[tag] or plan["labels"] == tag) and data_name != data:
            raise UserError(f"*_{tag} metrics judge with the {tag} classifier and need data.name = {data!r} "
                            f"(got {data_name!r}); use the *_inception metrics ({choices(INCEPTION_METRICS)})")
    return names


# Direction: FID/KID/losses are lower-is-better; accuracy, Inception Score, precision, recall and
# throughput higher. One rule for verdicts, reports, sweeps and scaling fits.
HIGHER_IS_BETTER = ("acc", "is_", "precision", "recall", "images_per_s")


def lower_is_better(metric: str) -> bool:
    name = metric.lower()
    return not any(name.startswith(p) or f"_{p}" in name for p in HIGHER_IS_BETTER)


def finite_number(x: Any) -> bool:
    """A real number that is not nan or inf (bools are not numbers here)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)  # numpy scalars too


def count_tag(n: int) -> str:
    """50000 -> '50k', 10000 -> '10k', 1234 -> '1234' (metric names carry the sample count)."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)
