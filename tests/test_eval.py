"""Evaluation: the digits classifier, torch-fidelity metrics and sample files."""
import threading
import time
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

import fcdm_lab.eval.classifier as clf
from fcdm_lab.data.digits import digits_arrays
from fcdm_lab.errors import UserError
from fcdm_lab.eval import fidelity
from fcdm_lab.eval.metrics import count_tag
from fcdm_lab.eval.fidelity import compute_metrics
from fcdm_lab.eval.samples_io import from_uint8, load_samples, save_npz, save_png_folder, to_uint8

from _fidelity_standin import StandInInception


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cache for the module: the classifier trains once (a few seconds), later tests load it."""
    return tmp_path_factory.mktemp("fcdm-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache_dir, monkeypatch):
    monkeypatch.setenv("FCDM_LAB_CACHE", str(cache_dir))


@pytest.fixture(scope="module")
def digits_u8():
    """(test images, train images) as uint8 (N, 1, 8, 8), test labels."""
    x_test, y_test = digits_arrays("test")
    x_train, _ = digits_arrays("train")
    return to_uint8(torch.from_numpy(x_test)), to_uint8(torch.from_numpy(x_train)), torch.from_numpy(y_test)


def _noise(n, shape=(1, 8, 8), seed=0):
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- the digits classifier ----------------------------------------------------------------------

def test_classifier_accuracy_and_cache_reuse(cache_dir, monkeypatch):
    trained = []
    real_train = clf._train_classifier
    monkeypatch.setattr(clf, "_train_classifier", lambda *a: trained.append(1) or real_train(*a))
    cached_before = clf.classifier_cache_path().exists()
    model = clf.get_digits_classifier()
    assert len(trained) == (0 if cached_before else 1)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    path = clf.classifier_cache_path()
    assert path.is_file() and path.parent.parent == cache_dir
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temp file behind

    x, y = map(torch.from_numpy, digits_arrays("test"))
    acc = clf.accuracy(model, x, y)
    assert acc >= 0.95
    with safe_open(path, "pt") as f:
        assert float(f.metadata()["test_accuracy"]) == pytest.approx(acc, abs=1e-6)

    # Second call: loads from disk, does not train (len(trained) stays what the first call left).
    n_trained = len(trained)
    again = clf.get_digits_classifier()
    assert len(trained) == n_trained
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k

    assert model.features(x[:5]).shape == (5, 128) and model(x[:5]).shape == (5, 10)
    # Features are scaled to unit mean square on the train split (KID's kernel expects order one).
    x_train = torch.from_numpy(digits_arrays("train")[0])
    assert model.features(x_train).pow(2).mean().item() == pytest.approx(1.0, rel=1e-3)


def test_classifier_training_is_reproducible_and_keyed():
    x, y = map(torch.from_numpy, digits_arrays("train"))
    cfg = clf.TrainConfig(epochs=1)
    a = clf._train_classifier(x[:256], y[:256], cfg).state_dict()
    b = clf._train_classifier(x[:256], y[:256], cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The cache key changes with the settings and with the data.
    assert clf.classifier_cache_path(cfg) != clf.classifier_cache_path()
    assert clf._cache_key(x[:256], y[:256], cfg) != clf._cache_key(x[1:257], y[1:257], cfg)


def test_cache_writes_are_atomic_under_races(tmp_path):
    # Two writers hammer one path while a reader loads it: every read is one complete version.
    path = tmp_path / "c" / "weights.safetensors"
    versions = [{"w": torch.full((64, 64), float(i))} for i in range(2)]
    errors, seen = [], set()

    def write(i):
        for _ in range(30):
            clf._atomic_save(versions[i], path, {"v": str(i)})

    writers = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in writers:
        t.start()
    while any(t.is_alive() for t in writers):
        if path.exists():
            try:
                w = load_file(path)["w"]
                seen.add(w[0, 0].item())
                assert torch.equal(w, torch.full_like(w, w[0, 0].item()))
            except Exception as e:  # noqa: BLE001 - any torn read is the failure we look for
                errors.append(e)
    for t in writers:
        t.join()
    assert not errors and seen <= {0.0, 1.0}
    assert [p.name for p in path.parent.iterdir()] == ["weights.safetensors"]


def test_classifier_resizes_and_accepts_rgb():
    model = clf.get_digits_classifier()
    x16, y = map(torch.from_numpy, digits_arrays("test", image_size=16))
    assert clf.accuracy(model, x16, y) >= 0.9  # 16x16 samples are resized back to 8x8
    x8 = torch.from_numpy(digits_arrays("test")[0][:8])
    torch.testing.assert_close(model(x8.repeat(1, 3, 1, 1)), model(x8))


def test_class_consistency(digits_u8):
    x_test, _, y_test = digits_u8
    assert clf.class_consistency(x_test, y_test) >= 0.95
    assert clf.class_consistency(from_uint8(x_test), (y_test + 1) % 10) < 0.1
    with pytest.raises(UserError, match="labels"):
        clf.class_consistency(x_test, y_test[:-1])
    with pytest.raises(UserError, match="0..9"):
        clf.class_consistency(x_test[:2], torch.tensor([0, 10]))


# ---- metrics ------------------------------------------------------------------------------------

def test_fid_digits_real_close_noise_far(digits_u8):
    real = compute_metrics("digits-test", "digits-train")
    assert set(real) == {"fid_digits", "kid_digits", "kid_digits_std"}  # never a plain "fid"
    noise = compute_metrics(_noise(297), "digits-train")
    assert 0 <= real["fid_digits"] < 2.0
    assert noise["fid_digits"] > 100 * real["fid_digits"]
    assert noise["kid_digits"] > 100 * abs(real["kid_digits"])
    # A tensor reference gives the same numbers as the split name.
    x_test, x_train, _ = digits_u8
    assert compute_metrics(x_test, x_train)["fid_digits"] == pytest.approx(real["fid_digits"], rel=1e-9)


def test_all_digits_metric_names(digits_u8):
    x_test, _, y_test = digits_u8
    out = compute_metrics(x_test, "digits-train", metrics=("fid", "kid", "is", "prc"), labels=y_test)
    assert set(out) == {"fid_digits", "kid_digits", "kid_digits_std", "is_digits", "is_digits_std",
                        "precision_digits", "recall_digits", "class_acc_digits"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in out.values())
    assert out["class_acc_digits"] >= 0.95
    assert 5 < out["is_digits"] <= 10  # 10 well-separated classes: IS near (at most) 10
    assert out["precision_digits"] > 0.7 and out["recall_digits"] > 0.7
    assert compute_metrics(x_test, "digits-train", metrics=(), labels=y_test) == {
        "class_acc_digits": out["class_acc_digits"]}


def test_fid_matches_closed_form_for_gaussians():
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (sqrt(v1_i) - sqrt(v2_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = fid_statistics_to_metric({"mu": mu1, "sigma": np.diag(v1)}, {"mu": mu2, "sigma": np.diag(v2)}, False)
    assert got["frechet_inception_distance"] == pytest.approx(expected, rel=1e-10)
    # Full covariances against the textbook form tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + np.eye(6), b @ b.T + np.eye(6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    r1 = scipy.linalg.sqrtm(s1).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
    got = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, False)
    assert got["frechet_inception_distance"] == pytest.approx(expected, rel=1e-8)


def test_kid_is_the_unbiased_mmd_with_cubic_kernel(digits_u8):
    # With subsets as large as both sets, every KID subset is the whole set: KID is exactly the
    # unbiased MMD^2 of the two feature sets under k(x, y) = (x.y / d + 1)^3, computed here by hand.
    x_test, _, _ = digits_u8
    fake, real = _noise(40, seed=1), x_test[:40]
    out = compute_metrics(fake, real, metrics=("kid",))
    model = clf.get_digits_classifier()
    with torch.no_grad():
        fx = model.features(from_uint8(fake)).double().numpy()
        fy = model.features(from_uint8(real)).double().numpy()
    d, m = fx.shape[1], len(fx)
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(fx, fx), k(fy, fy), k(fx, fy)
    mmd2 = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.sum() / m**2)
    assert out["kid_digits"] == pytest.approx(mmd2, rel=1e-4)
    assert out["kid_digits_std"] == pytest.approx(0.0, abs=1e-6 * abs(mmd2))


def test_reference_cache_is_keyed_by_content(digits_u8, tmp_path):
    x_test, x_train, _ = digits_u8
    cache = tmp_path / "fid-cache"
    first = compute_metrics(x_test, x_train, metrics=("fid",), cache_dir=cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries and all(name.startswith("ref-") for name in entries)
    assert compute_metrics(x_test, x_train, metrics=("fid",), cache_dir=cache) == first
    assert sorted(p.name for p in cache.iterdir()) == entries  # reused, nothing new
    # Same shape, other content: new cache entries and a different FID, not stale statistics.
    other = compute_metrics(x_test, x_train.flip(-1), metrics=("fid",), cache_dir=cache)
    assert other["fid_digits"] > 10 * first["fid_digits"]
    assert len(list(cache.iterdir())) > len(entries)


def test_bad_choices_raise_user_errors(digits_u8):
    x_test, x_train, y_test = digits_u8
    with pytest.raises(UserError, match="digits, inception"):
        compute_metrics(x_test, x_train, extractor="clip")
    with pytest.raises(UserError, match="fid, kid, is, prc"):
        compute_metrics(x_test, x_train, metrics=("fid", "precision"))
    with pytest.raises(UserError, match="digits-train, digits-test"):
        compute_metrics(x_test, "digits-val")
    with pytest.raises(UserError, match="extractor='digits'"):
        compute_metrics(x_test, x_train, extractor="inception", labels=y_test)
    with pytest.raises(UserError, match="uint8"):
        compute_metrics(from_uint8(x_test), x_train)
    with pytest.raises(UserError, match="at least 4"):
        compute_metrics(x_test[:3], x_train, metrics=("prc",))


def test_digits_extractor_registration_is_idempotent():
    assert fidelity.register_digits_extractor() == fidelity.register_digits_extractor() == "digits-cnn"
    assert FEATURE_EXTRACTORS_REGISTRY["digits-cnn"] is fidelity.DigitsFeatureExtractor
    with pytest.raises(ValueError, match="already registered"):  # why the guard exists
        register_feature_extractor("digits-cnn", fidelity.DigitsFeatureExtractor)


def test_inception_offline_error_is_fast_and_says_how(tmp_path, monkeypatch, digits_u8):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", offline)  # what torch hub's download calls
    x_test, x_train, _ = digits_u8
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        compute_metrics(x_test[:8], x_train[:8], extractor="inception")
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "\n" not in msg
    for needed in ("--inception-weights PATH", fidelity.INCEPTION_WEIGHTS_FILE, "$TORCH_HOME/hub/checkpoints/",
                   str(tmp_path / "torch-home" / "hub" / "checkpoints")):
        assert needed in msg
    with pytest.raises(UserError, match="does not exist"):
        compute_metrics(x_test[:8], x_train[:8], extractor="inception", inception_weights=tmp_path / "nope.pth")


def test_inception_path_names_channels_and_weights_cache(tmp_path, monkeypatch, digits_u8):
    monkeypatch.setattr(fidelity, "INCEPTION_NETWORK", StandInInception)
    StandInInception.state_dicts.clear()
    weights = StandInInception.save_weights(tmp_path / "standin-inception.pth")
    x_test, x_train, _ = digits_u8
    cache = tmp_path / "cache"
    kw = dict(extractor="inception", inception_weights=weights, cache_dir=cache)
    out = compute_metrics(x_test[:250], x_train[:300], metrics=("fid", "kid", "is", "prc"), **kw)
    assert set(out) == {"fid_inception_250", "kid_inception_250", "kid_inception_250_std", "is_inception_250",
                        "is_inception_250_std", "precision_inception_250", "recall_inception_250"}
    assert all(np.isfinite(v) for v in out.values())
    # one network, given the file's (verified) tensors; grayscale reached it as 3 channels
    assert len(StandInInception.state_dicts) == 1 and set(StandInInception.state_dicts[0]) == {"proj", "cls"}
    # Other weights, same reference: a new cache entry rather than statistics from the old network.
    n_entries = len(list(cache.iterdir()))
    StandInInception.save_weights(weights, scale=2.0)
    compute_metrics(x_test[:250], x_train[:300], metrics=("fid",), **kw)
    assert len(list(cache.iterdir())) > n_entries


def test_sample_count_tag():
    assert [count_tag(n) for n in (5000, 50000, 10000, 1500, 297)] == ["5k", "50k", "10k", "1500", "297"]


# ---- sample files -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (4, 3, 6, 7)])
def test_npz_and_png_folder_round_trip(tmp_path, shape):
    images = _noise(shape[0], shape[1:], seed=shape[1])
    npz = save_npz(tmp_path / "samples.npz", images)
    with np.load(npz) as data:
        assert data["arr_0"].shape == (shape[0], shape[2], shape[3], shape[1])  # ADM: NHWC
    assert torch.equal(load_samples(npz), images)
    assert torch.equal(load_samples(save_png_folder(tmp_path / "pngs", images)), images)


def test_uint8_conversion_round_trip():
    u = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    assert torch.equal(to_uint8(from_uint8(u)), u)
    assert to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]


def test_metrics_from_sample_files(tmp_path, digits_u8):
    x_test, _, _ = digits_u8
    from_tensor = compute_metrics(x_test, "digits-train", metrics=("fid",))
    npz = save_npz(tmp_path / "s.npz", x_test)
    assert compute_metrics(str(npz), "digits-train", metrics=("fid",)) == from_tensor
    assert compute_metrics(save_png_folder(tmp_path / "png", x_test), "digits-train", metrics=("fid",)) == from_tensor


def test_bad_sample_paths_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(UserError, match="missing"):
        load_samples(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty.*no images"):
        load_samples(tmp_path / "empty")
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(UserError, match="wrong.npz.*arr_0"):
        load_samples(tmp_path / "wrong.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(UserError, match="float.npz.*uint8"):
        load_samples(tmp_path / "float.npz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="notes.txt"):
        load_samples(tmp_path / "notes.txt")
