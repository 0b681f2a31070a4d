"""Evaluation never runs code from a file: Inception weights are read as tensors only and checked,
and the reference cache is .npz read with allow_pickle=False (torch-fidelity's own loader and cache
use torch.load(weights_only=False)). The safe Inception path gives torch-fidelity's numbers."""
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch_fidelity import calculate_metrics
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from fcdm_lab.data.digits import digits_arrays
from fcdm_lab.errors import UserError
from fcdm_lab.eval import fidelity
from fcdm_lab.eval.fidelity import UInt8Images, check_inception_weights, compute_metrics
from fcdm_lab.eval.samples_io import save_npz, to_uint8

from _fidelity_standin import StandInInception


class Payload:
    """Unpickling this creates the folder `marker`: what a hostile file would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _one_line_error(err, path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg  # torch's unsafe advice
    return msg


def _images(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# ---- Inception weights --------------------------------------------------------------------------------

def _payload_files(folder, marker):
    """Hostile weights files: a bare pickle, torch.save'd objects (zip format) and a state dict of
    real tensors with one hostile entry."""
    folder.mkdir()
    (folder / "bare.pth").write_bytes(pickle.dumps({"fc.weight": Payload(marker)}))
    torch.save({"fc.weight": Payload(marker)}, folder / "zip.pth")
    net = StandInInception("x", ["2048"])
    torch.save({**net.state_dict(), "extra": Payload(marker)}, folder / "mixed.pt")
    torch.save(Payload(marker), folder / "top-level.bin")
    return sorted(folder.iterdir())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, about the bare pickle
def test_pickle_payload_as_inception_weights_is_refused_and_never_runs(tmp_path, monkeypatch):
    from fcdm_lab.eval.evaluate import evaluate_checkpoint

    marker = tmp_path / "payload-ran"
    samples = save_npz(tmp_path / "samples.npz", _images(12))
    for network in (fidelity.VerifiedInceptionV3, StandInInception):  # the real network's checks and a stand-in's
        monkeypatch.setattr(fidelity, "INCEPTION_NETWORK", network)
        for path in _payload_files(tmp_path / network.__name__, marker):
            with pytest.raises(UserError) as err:
                check_inception_weights(path)
            msg = _one_line_error(err, path)
            assert "refused" in msg and "objects other than tensors" in msg and "expected a state dict" in msg
            with pytest.raises(UserError) as err:
                compute_metrics(_images(4), _images(4, seed=1), extractor="inception", metrics=("kid",),
                                inception_weights=path)
            _one_line_error(err, path)
            with pytest.raises(UserError) as err:  # `fcdm-lab evaluate --samples ... --inception-weights evil`
                evaluate_checkpoint(None, samples=samples, reference=str(samples), inception_weights=path,
                                    track=False, progress=False)
            _one_line_error(err, path)
            assert not marker.exists()
    # the payloads are real: unsafe loading runs them
    torch.load(tmp_path / "StandInInception" / "zip.pth", weights_only=False)
    assert marker.is_dir()


def test_published_file_name_needs_the_published_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity, "INCEPTION_NETWORK", StandInInception)
    marker = tmp_path / "payload-ran"
    for name in fidelity.PUBLISHED_INCEPTION_FILES:
        evil = tmp_path / "evil" / name
        evil.parent.mkdir(exist_ok=True)
        torch.save({"fc.weight": Payload(marker)}, evil)
        good_tensors = StandInInception.save_weights(tmp_path / name)  # fits the network, other bytes
        for path in (evil, good_tensors):
            with pytest.raises(UserError, match="sha256") as err:
                check_inception_weights(path)
            assert fidelity.INCEPTION_WEIGHTS_SHA256 in _one_line_error(err, path)
    assert not marker.exists()
    # the default file (torch hub's copy) is checked the same way; a damaged copy is not downloaded over
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    evil = tmp_path / "evil" / fidelity.INCEPTION_WEIGHTS_FILE
    (hub / fidelity.INCEPTION_WEIGHTS_FILE).write_bytes(evil.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(UserError, match="sha256.*delete it and download"):
        check_inception_weights()
    assert not marker.exists()
    # with the published digest the check passes (here: the digest of a stand-in file under that name)
    path = tmp_path / fidelity.INCEPTION_WEIGHTS_FILE
    monkeypatch.setattr(fidelity, "INCEPTION_WEIGHTS_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    assert check_inception_weights(path) == path


def test_weights_that_do_not_fit_the_network_are_refused(tmp_path):
    """Against the real Inception-v3 architecture (keys and shapes from the meta device: nothing big
    is built)."""
    shapes = fidelity.VerifiedInceptionV3.expected_state_dict_shapes()
    assert len(shapes) == 566 and shapes["fc.weight"] == (1008, 2048) and shapes["Mixed_7c.branch_pool.conv.weight"] \
        == (192, 2048, 1, 1)
    small = {k: torch.zeros(1) for k in list(shapes)[:3]}
    cases = {
        "list.pth": ([torch.zeros(3)], "hold a list, not a state dict"),
        "string-value.pth": ({"fc.weight": "x"}, "entry 'fc.weight' is a str, not a dense tensor"),
        "int-key.pth": ({1: torch.zeros(1)}, "entry 1 is a Tensor"),
        "missing.pth": (small, "keys 469 missing"),  # 472 less 3; the BatchNorm counters may be missing
        "unexpected.safetensors": ({"conv.weight": torch.zeros(2)}, "and 1 unexpected (e.g. conv.weight)"),
        "not-torch.pth": (b"stand-in weights", "does not read as a PyTorch file"),
        "empty.pth": (b"", "does not read as a PyTorch file"),
        "not-safetensors.safetensors": (b"\x00" * 16, "do not read as safetensors"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif name.endswith(".safetensors"):
            save_file(content, path)
        else:
            torch.save(content, path)
        with pytest.raises(UserError) as err:
            check_inception_weights(path)
        msg = _one_line_error(err, path)
        assert expected in msg and "expected a state dict of Inception-v3 tensors" in msg, msg
    with pytest.raises(UserError, match="does not exist"):
        check_inception_weights(tmp_path / "nope.pth")


def test_wrong_shapes_and_dtypes_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity, "INCEPTION_NETWORK", StandInInception)
    net = StandInInception("x", ["2048"])
    good = net.state_dict()
    for name, sd, expected in (
            ("shape.pth", {**good, "proj": torch.zeros(3, 3)}, "proj has shape (3, 3), the network (192, 64)"),
            ("dtype.pth", {**good, "cls": good["cls"].long()}, "cls is torch.int64, expected floating point")):
        torch.save(sd, tmp_path / name)
        with pytest.raises(UserError) as err:
            check_inception_weights(tmp_path / name)
        assert expected in _one_line_error(err, tmp_path / name)
    save_file({k: v.contiguous() for k, v in good.items()}, tmp_path / "good.safetensors")
    assert check_inception_weights(tmp_path / "good.safetensors") == tmp_path / "good.safetensors"


# ---- the safe Inception path against torch-fidelity's own -------------------------------------------

@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A random Inception-v3 state dict (He-scaled convolutions, so features neither vanish nor blow
    up), saved like the published file: a plain dict of tensors without the BatchNorm counters."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in fidelity.VerifiedInceptionV3.expected_state_dict_shapes().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("conv.weight"):
            value = torch.randn(shape, generator=g) * (2.0 / np.prod(shape[1:])) ** 0.5
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=g)
        elif key == "fc.weight":
            value = torch.randn(shape, generator=g) / 2048 ** 0.5
        else:  # BatchNorm biases and means, the fc bias
            value = torch.randn(shape, generator=g) / 10
        state[key] = value
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(state, path)
    return path


LAYERS = ["64", "192", "768", "2048", "logits_unbiased", "logits"]


def test_verified_inception_gives_torch_fidelitys_features(random_inception_weights):
    ours = fidelity.inception_network(LAYERS, random_inception_weights)
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", LAYERS,
                                         feature_extractor_weights_path=str(random_inception_weights))
    assert isinstance(ours, FeatureExtractorInceptionV3)  # its forward, its interpolation
    theirs_state = theirs.state_dict()
    expected = fidelity.VerifiedInceptionV3.expected_state_dict_shapes()
    assert {k: tuple(v.shape) for k, v in theirs_state.items()} == expected
    assert all(torch.equal(v, theirs_state[k]) for k, v in ours.state_dict().items())
    x = _images(2, size=32)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    for name, fa, fb in zip(LAYERS, a, b):
        assert torch.equal(fa, fb), name
    features = a[LAYERS.index("2048")]
    assert torch.isfinite(features).all() and features.std() > 1e-3 and not torch.equal(features[0], features[1])


@pytest.mark.slow  # two 2048x2048 eigendecompositions and 18 Inception forwards: ~15 s on one CPU thread
def test_safe_inception_metrics_equal_torch_fidelitys(random_inception_weights, tmp_path):
    fake, real = _images(4, size=24), _images(5, size=24, seed=1)
    ours = compute_metrics(fake, real, extractor="inception", metrics=("fid", "kid", "prc"),
                           inception_weights=random_inception_weights, cache_dir=tmp_path / "cache")
    theirs = calculate_metrics(input1=UInt8Images(fake), input2=UInt8Images(real),
                               feature_extractor="inception-v3-compat",
                               feature_extractor_weights_path=str(random_inception_weights), fid=True, kid=True,
                               prc=True, kid_subset_size=4, prc_neighborhood=3, save_cpu_ram=True, cache=False,
                               cuda=False, verbose=False)
    assert ours == {"fid_inception_4": theirs["frechet_inception_distance"],
                    "kid_inception_4": theirs["kernel_inception_distance_mean"],
                    "kid_inception_4_std": theirs["kernel_inception_distance_std"],
                    "precision_inception_4": theirs["precision"], "recall_inception_4": theirs["recall"]}
    # again from the .npz cache of the reference: the same numbers
    assert compute_metrics(fake, real, extractor="inception", metrics=("fid", "kid", "prc"),
                           inception_weights=random_inception_weights, cache_dir=tmp_path / "cache") == ours


# ---- the reference cache ----------------------------------------------------------------------------

def _plant(cache, marker):
    """Over every cache entry: the .npz replaced by one with pickled object arrays (runs `marker`'s
    payload when loaded with allow_pickle=True) and torch-fidelity's old .pt name beside it holding a
    pickle payload. Returns one hostile .npz kept aside, to show the payload is real."""
    entries = sorted(cache.glob("ref-*.npz"))
    assert entries
    for path in entries:
        torch.save({"mu": Payload(marker)}, path.with_suffix(".pt"))  # what torch-fidelity would have loaded
        names = np.load(path, allow_pickle=False).files
        np.savez(path.with_suffix(".tmp.npz"), **{k: np.array([Payload(marker)], dtype=object) for k in names})
        os.replace(path.with_suffix(".tmp.npz"), path)
    proof = cache.parent / "proof.npz"
    proof.write_bytes(entries[0].read_bytes())
    (cache / "ref-not-an-npz.npz").write_bytes(pickle.dumps(Payload(marker)))
    return entries, proof


def test_planted_cache_files_never_run_and_are_replaced(tmp_path, monkeypatch):
    """The digits extractor's cache (its 128-d features and FID statistics), with a quickly trained
    classifier (seconds less than the real one; the cache logic is the same)."""
    import dataclasses

    import fcdm_lab.eval.classifier as clf

    quick = dataclasses.replace(clf.CLASSIFIERS["digits"], cfg=clf.TrainConfig(widths=(8, 16, 16), epochs=1,
                                                                                version=99))
    monkeypatch.setitem(clf.CLASSIFIERS, "digits", quick)
    x_test = to_uint8(torch.from_numpy(digits_arrays("test")[0]))
    x_train = to_uint8(torch.from_numpy(digits_arrays("train")[0]))
    cache, marker = tmp_path / "cache", tmp_path / "payload-ran"
    first = compute_metrics(x_test, x_train[:400], metrics=("fid", "kid", "prc"), cache_dir=cache)
    assert sorted(p.name.split("-", 2)[2] for p in cache.iterdir()) == [
        "digits-cnn-features-128.npz", "digits-cnn-stat-fid-128.npz"]  # nothing left aside
    entries, proof = _plant(cache, marker)
    again = compute_metrics(x_test, x_train[:400], metrics=("fid", "kid", "prc"), cache_dir=cache)
    assert again == first and not marker.exists()
    for path in entries:  # rewritten as plain arrays
        with np.load(path, allow_pickle=False) as data:
            assert all(data[k].dtype.kind == "f" for k in data.files)
    # a .npy, a truncated file and a file of other arrays are ignored the same way
    stat = next(p for p in entries if "stat-fid" in p.name)
    for content in (lambda p: np.save(open(p, "wb"), np.zeros(3)), lambda p: p.write_bytes(b"PK\x03\x04junk"),
                    lambda p: np.savez(open(p, "wb"), mu=np.zeros(5, np.float32), sigma=np.zeros((5, 5)))):
        content(stat)
        assert compute_metrics(x_test, x_train[:400], metrics=("fid",), cache_dir=cache)["fid_digits"] \
            == first["fid_digits"]
    assert not marker.exists()
    with np.load(proof, allow_pickle=True) as data:  # the planted arrays were hostile
        data[data.files[0]]
    assert marker.is_dir()


def test_evaluate_with_a_planted_cache_never_unpickles(tmp_path, monkeypatch):
    """`fcdm-lab evaluate` on existing samples (the ADM protocol: FID from the reference's mu/sigma,
    precision/recall from its images) twice, with hostile files planted over the whole cache folder in
    between; no torch.load in the process runs with weights_only other than True."""
    from fcdm_lab.eval.evaluate import evaluate_checkpoint

    monkeypatch.setenv("FCDM_LAB_CACHE", str(tmp_path / "fcdm-cache"))
    monkeypatch.setattr(fidelity, "INCEPTION_NETWORK", StandInInception)
    weights = StandInInception.save_weights(tmp_path / "standin-inception.pth")
    loads = []
    real_load = torch.load

    def checked_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 64)) / 8
    reference = tmp_path / "VIRTUAL_ref.npz"
    np.savez(reference, arr_0=rng.integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8),
             mu=rng.normal(size=64) / 4, sigma=a @ a.T + 0.01 * np.eye(64))
    samples = save_npz(tmp_path / "samples.npz", _images(20))
    kw = dict(samples=samples, reference=str(reference), inception_weights=weights, track=False, progress=False)
    first = evaluate_checkpoint(None, **kw)
    assert set(first) == {"fid20", "is20", "is20_std", "precision20", "recall20"}
    marker = tmp_path / "payload-ran"
    _plant(tmp_path / "fcdm-cache" / "fidelity", marker)
    assert evaluate_checkpoint(None, **kw) == first
    assert not marker.exists()
    assert loads and all(w is True for w in loads), loads
