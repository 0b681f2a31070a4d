"""FID / KID / IS / precision-recall through torch-fidelity, with two feature extractors.

- "digits": the 128-d penultimate layer of the digits CNN (`classifier.py`), registered with
  torch-fidelity as "digits-cnn". Metric names end in `_digits` (`fid_digits`, never plain "fid"):
  these numbers are not comparable with Inception FIDs. "fashion" is the same for Fashion-MNIST
  ("fashion-cnn", `fid_fashion`).
- "inception": torch-fidelity's "inception-v3-compat" (the TF-FID network). Names carry the sample
  count (`fid_inception_5k`), so a 5k proxy FID is never mistaken for FID-50K.

torch-fidelity keys its statistics cache by name only, so the reference set's cache name carries a
fingerprint of its content and of the feature extractor's weights: other data or other weights get
other cache entries instead of stale statistics.
"""
from __future__ import annotations

import hashlib
import os
import threading
import urllib.error
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity import calculate_metrics
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from fcdm_lab.errors import UserError, choices
from fcdm_lab.eval.classifier import (
    FEATURE_DIM,
    cache_root,
    class_consistency,
    classifier_cache_path,
    get_classifier,
)
from fcdm_lab.eval.samples_io import NPZ_KEYS, check_images_uint8, from_uint8, load_samples, to_uint8

DIGITS_EXTRACTOR = "digits-cnn"
FASHION_EXTRACTOR = "fashion-cnn"
INCEPTION_EXTRACTOR = "inception-v3-compat"
EXTRACTORS = {"digits": DIGITS_EXTRACTOR, "inception": INCEPTION_EXTRACTOR, "fashion": FASHION_EXTRACTOR}
CLASSIFIER_EXTRACTORS = ("digits", "fashion")  # our own CNNs (classifier.CLASSIFIERS); they also judge labels
METRICS = ("fid", "kid", "is", "prc")
DIGITS_REFERENCES = {"digits-train": "train", "digits-test": "test"}
FASHION_REFERENCES = {"fashion-train": "train", "fashion-test": "test"}
REFERENCES = (*DIGITS_REFERENCES, *FASHION_REFERENCES)
INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
KID_MAX_SUBSET = 1000  # torch-fidelity's default subset size, lowered when a set is smaller
PRC_NEIGHBORHOOD = 3
ISC_SPLITS = 10


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity view of the digits CNN: uint8 (N, 1|3, H, W) -> the 128-d features and the logits.
    Subclasses name another of classifier.CLASSIFIERS."""

    classifier_name = "digits"

    def __init__(self, name, features_list, **kwargs):  # kwargs: all calculate_metrics options, unused
        super().__init__(name, features_list)
        self.classifier = get_classifier(self.classifier_name, "cpu")  # torch-fidelity moves us to CUDA when asked

    @staticmethod
    def get_provided_features_list():
        return str(FEATURE_DIM), "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": str(FEATURE_DIM), "kid": str(FEATURE_DIM), "prc": str(FEATURE_DIM)}[metric]

    @staticmethod
    def can_be_compiled():
        return False  # a few thousand 8x8 images: compiling would cost more than it saves

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8):
            raise ValueError(f"{EXTRACTORS[self.classifier_name]} expects uint8 image batches")
        feats, logits = self.classifier.features_and_logits(from_uint8(x))
        out = {str(FEATURE_DIM): feats, "logits": logits}
        return tuple(out[name] for name in self.features_list)


class FashionFeatureExtractor(DigitsFeatureExtractor):
    """torch-fidelity view of the Fashion-MNIST CNN (28x28)."""

    classifier_name = "fashion"

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)


_register_lock = threading.Lock()
_EXTRACTOR_CLASSES = {"digits": DigitsFeatureExtractor, "fashion": FashionFeatureExtractor}


def register_classifier_extractor(extractor: str = "digits") -> str:
    """Register one of our CNNs ("digits" -> "digits-cnn", "fashion" -> "fashion-cnn") with
    torch-fidelity once per process (a second registration raises there); returns the name."""
    name = EXTRACTORS[extractor]
    with _register_lock:
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, _EXTRACTOR_CLASSES[extractor])
    return name


def register_digits_extractor() -> str:
    return register_classifier_extractor("digits")


class UInt8Images(Dataset):
    """A uint8 (N, C, H, W) tensor as the Dataset torch-fidelity wants: items are bare CHW tensors
    (a tuple-returning TensorDataset is rejected)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def fingerprint(images: torch.Tensor) -> str:
    """Short sha256 of a uint8 sample set's shape and bytes."""
    h = hashlib.sha256(f"{tuple(images.shape)}:{images.dtype}".encode())
    h.update(images.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


_file_digests: dict[tuple, str] = {}


def _file_fingerprint(path: Path) -> str:
    """sha256 prefix of a weights file, memoised per (path, size, mtime): hashing ~100 MB once is
    cheap next to running Inception."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _file_digests[key] = h.hexdigest()[:16]
    return _file_digests[key]


def resolve_images(images, what: str = "samples") -> torch.Tensor:
    """A sample set as uint8 (N, C, H, W) from a tensor, a path (PNG folder or ADM .npz), or a
    split name ("digits-train", "digits-test", "fashion-train", "fashion-test")."""
    if isinstance(images, (str, os.PathLike)):
        if isinstance(images, str) and images in DIGITS_REFERENCES:
            from fcdm_lab.data.digits import digits_arrays

            return to_uint8(torch.from_numpy(digits_arrays(DIGITS_REFERENCES[images])[0]))
        if isinstance(images, str) and images in FASHION_REFERENCES:
            from fcdm_lab.data.fashion import fashion_arrays

            return to_uint8(torch.from_numpy(fashion_arrays(FASHION_REFERENCES[images])[0]))
        if not Path(images).exists():
            raise UserError(f"{what} {str(images)!r} is neither an existing folder / .npz file nor a "
                            f"reference name ({choices(REFERENCES)})")
        return load_samples(images)
    return check_images_uint8(images, what).cpu()  # the loader pins CPU memory when CUDA is used


def _inception_weights(inception_weights) -> Path:
    """The local Inception-v3 weights file: the given path, else torch hub's cache (downloading it
    there when online). Offline without the file: a UserError saying how to provide it."""
    if inception_weights is not None:
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise UserError(f"Inception weights file {str(path)!r} does not exist (expected torch-fidelity's "
                            f"{INCEPTION_WEIGHTS_FILE}, from {URL_INCEPTION_V3})")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # the same download torch-fidelity would do, done here so a failure gets a useful message
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=False)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise UserError(
                f"Inception-v3 weights are not cached and could not be downloaded ({e}); download "
                f"{URL_INCEPTION_V3} where there is internet, then pass --inception-weights PATH "
                f"(inception_weights=PATH in Python) or put the file {INCEPTION_WEIGHTS_FILE} in "
                f"$TORCH_HOME/hub/checkpoints/ (here: {path.parent})") from None
    return path


def reference_statistics(reference) -> dict | None:
    """{"mu", "sigma", "has_images"} of an .npz reference that carries precomputed FID statistics, as
    the ADM reference batches do (Inception pool3 statistics of the whole training set, next to 10k
    sample images under arr_0); None for anything else."""
    if not isinstance(reference, (str, os.PathLike)) or Path(reference).suffix != ".npz" \
            or not Path(reference).is_file():
        return None
    try:
        with np.load(reference) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                return None
            mu, sigma = np.asarray(data["mu"]), np.asarray(data["sigma"])
            has_images = any(k in data.files for k in NPZ_KEYS)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read reference {str(reference)!r} as .npz: {e}") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"reference {str(reference)!r}: mu must be (d,) and sigma (d, d); got {mu.shape} and "
                        f"{sigma.shape}")
    return {"mu": mu, "sigma": sigma, "has_images": has_images}


def _seed_reference_statistics(stats: dict, ref_id: str, cache: Path) -> str:
    """Put precomputed reference statistics where torch-fidelity looks for the reference's cached FID
    statistics, so its own FID path uses them instead of statistics of the reference's images
    (torch-fidelity has no option for precomputed statistics; its cache is the documented way in).
    Returns the cache id to pass as the reference's (input2) cache name."""
    digest = hashlib.sha256(stats["mu"].tobytes() + stats["sigma"].tobytes()).hexdigest()[:16]
    ref_id = hashlib.sha256(f"{ref_id}:stats-{digest}".encode()).hexdigest()[:16]
    extractor = INCEPTION_EXTRACTOR
    layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
    path = cache / f"ref-{ref_id}-{extractor}-stat-fid-{layer}.pt"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # the dtypes torch-fidelity computes for the samples (float32 features: float32 mu, float64
        # sigma); its FID refuses statistics of different dtypes
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"mu": stats["mu"].astype(np.float32), "sigma": stats["sigma"].astype(np.float64)}, tmp)
        os.replace(tmp, path)
    return ref_id


def _count_tag(n: int) -> str:
    """5000 -> '5k', 50000 -> '50k', 1234 -> '1234'."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def compute_metrics(samples, reference, *, extractor: str = "digits", metrics: Iterable[str] = ("fid", "kid"),
                    inception_weights: str | os.PathLike | None = None, labels=None,
                    cache_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """Distribution metrics of `samples` against `reference` with torch-fidelity.

    samples: uint8 tensor (N, C, H, W) with C in {1, 3}, a folder of PNGs, an ADM .npz (arr_0, NHWC
        uint8), or a split name. reference: the same kinds ("digits-train" / "digits-test" /
        "fashion-train" / "fashion-test").
    extractor: "digits" (the digits CNN, any image size: resized to 8x8), "fashion" (the Fashion-MNIST
        CNN, resized to 28x28) or "inception"
        (inception-v3-compat; grayscale is repeated to 3 channels).
    metrics: any of "fid", "kid", "is" (Inception Score; for digits from the CNN's logits), "prc"
        (precision/recall, k=3).
    labels: conditioning classes of the samples (digits / fashion only): adds class_acc_<extractor>.
    cache_dir: torch-fidelity's cache for reference features/statistics
        (default: $FCDM_LAB_CACHE/fidelity or ~/.cache/fcdm-lab/fidelity).

    Returns floats keyed `<metric>_<tag>`, tag = "digits" or "inception_<count>" (e.g. "inception_5k"):
    fid_*, kid_* (mean), kid_*_std, is_*, is_*_std, precision_*, recall_*, and class_acc_digits|fashion.
    """
    if extractor not in EXTRACTORS:
        raise UserError(f"unknown feature extractor {extractor!r}; valid: {choices(EXTRACTORS)}")
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UserError(f"unknown metric(s) {choices(bad)}; valid: {choices(METRICS)}")
    if labels is not None and extractor not in CLASSIFIER_EXTRACTORS:
        raise UserError("labels (class consistency) need extractor='digits' or 'fashion': the judge is that "
                        "dataset's classifier")
    if not metrics and labels is None:
        raise UserError(f"nothing to compute: give metrics (valid: {choices(METRICS)}) or labels")

    fake = resolve_images(samples, "samples")
    stats = reference_statistics(reference) if extractor == "inception" else None
    if stats is not None and not stats["has_images"]:
        if set(metrics) - {"fid", "is"}:
            raise UserError(f"reference {str(reference)!r} holds FID statistics (mu, sigma) but no images: "
                            f"kid and precision/recall need the images; ask for fid and is only")
        real = fake  # a placeholder torch-fidelity never reads: the FID statistics come from the cache
    else:
        real = resolve_images(reference, "reference")
    out: dict[str, float] = {}
    if labels is not None:
        out[f"class_acc_{extractor}"] = class_consistency(fake, labels, name=extractor)
    if not metrics:
        return out

    n_min = min(len(fake), len(real))
    if "kid" in metrics and n_min < 2:
        raise UserError(f"KID needs at least 2 images in each set; got {len(fake)} samples, {len(real)} reference")
    if "prc" in metrics and n_min < PRC_NEIGHBORHOOD + 1:
        raise UserError(f"precision/recall need at least {PRC_NEIGHBORHOOD + 1} images in each set; "
                        f"got {len(fake)} samples, {len(real)} reference")
    if "is" in metrics and len(fake) < ISC_SPLITS:
        raise UserError(f"Inception Score needs at least {ISC_SPLITS} samples (one per split); got {len(fake)}")

    extra = {}
    if extractor in CLASSIFIER_EXTRACTORS:
        register_classifier_extractor(extractor)
        # hashes the classifier's training data and settings
        weights_id = classifier_cache_path(name=extractor).stem
        tag = extractor
    else:
        weights = _inception_weights(inception_weights)
        extra["feature_extractor_weights_path"] = str(weights)
        weights_id = f"inception-{_file_fingerprint(weights)}"
        tag = f"inception_{_count_tag(len(fake))}"
        # Inception wants RGB; grayscale digits become 3 equal channels.
        fake = fake.expand(-1, 3, -1, -1) if fake.shape[1] == 1 else fake
        real = real.expand(-1, 3, -1, -1) if real.shape[1] == 1 else real

    ref_id = hashlib.sha256(f"{fingerprint(real)}:{weights_id}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "fidelity"
    if stats is not None and "fid" in metrics:
        ref_id = _seed_reference_statistics(stats, ref_id, cache)
    result = calculate_metrics(
        input1=UInt8Images(fake), input2=UInt8Images(real),
        feature_extractor=EXTRACTORS[extractor],
        fid="fid" in metrics, kid="kid" in metrics, isc="is" in metrics, prc="prc" in metrics,
        cuda=torch.cuda.is_available(),
        kid_subset_size=min(KID_MAX_SUBSET, n_min),
        prc_neighborhood=PRC_NEIGHBORHOOD, isc_splits=ISC_SPLITS,
        save_cpu_ram=True,  # no loader worker processes: the 2-core machines oversubscribe otherwise
        verbose=False,
        cache_root=str(cache), input2_cache_name=f"ref-{ref_id}",
        **extra,
    )
    if "fid" in metrics:
        out[f"fid_{tag}"] = float(result["frechet_inception_distance"])
    if "kid" in metrics:
        out[f"kid_{tag}"] = float(result["kernel_inception_distance_mean"])
        out[f"kid_{tag}_std"] = float(result["kernel_inception_distance_std"])
    if "is" in metrics:
        out[f"is_{tag}"] = float(result["inception_score_mean"])
        out[f"is_{tag}_std"] = float(result["inception_score_std"])
    if "prc" in metrics:
        out[f"precision_{tag}"] = float(result["precision"])
        out[f"recall_{tag}"] = float(result["recall"])
    return out
