"""Datasets: digits split, image folders, torchvision offline errors, latent stores, build_dataset."""
import json
import os
import pickle
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fcdm_lab.data import (DATASETS, ImageFolderDataset, LatentStore, build_dataset, center_crop_arr,
                           digits_arrays, extract_latents, load_digits_split, load_vae, write_latent_store)
from fcdm_lab.data.images import TORCHVISION_DATASETS
from fcdm_lab.errors import UserError


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------

def test_digits_split_sizes_range_and_labels():
    x_tr, y_tr = digits_arrays("train")
    x_te, y_te = digits_arrays("test")
    assert x_tr.shape == (1500, 1, 8, 8) and x_te.shape == (297, 1, 8, 8)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert x_tr.min() == -1.0 and x_tr.max() == 1.0  # 0 and 16 both occur
    assert set(np.unique(y_tr)) == set(range(10)) == set(np.unique(y_te))
    ds = load_digits_split("train")
    x, y = ds[3]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and int(y) == y_tr[3]


def test_digits_split_is_stratified_disjoint_and_deterministic():
    from sklearn.datasets import load_digits

    all_y = load_digits().target
    _, y_te = digits_arrays("test")
    expected = np.bincount(all_y) * 297 / len(all_y)
    assert np.all(np.abs(np.bincount(y_te) - expected) <= 1)
    # train + test is exactly the full set (no image in both, none lost)
    rows = lambda x: sorted(r.tobytes() for r in x.reshape(len(x), -1))  # noqa: E731
    x_tr, _ = digits_arrays("train")
    x_te, _ = digits_arrays("test")
    full = load_digits().images.astype(np.float32)[:, None] / 8 - 1
    assert rows(np.concatenate([x_tr, x_te])) == rows(full)
    x2, y2 = digits_arrays("test")
    assert np.array_equal(x2, x_te) and np.array_equal(y2, y_te)


def test_digits_resize_and_bad_split():
    x, _ = digits_arrays("test", image_size=16)
    assert x.shape == (297, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(UserError, match="train, test"):
        digits_arrays("val")


def test_build_digits_info_and_fingerprint():
    ds, info = build_dataset({"name": "digits"})
    assert info == {"name": "digits", "channels": 1, "image_size": 8, "num_classes": 10, "num_items": 1500,
                    "fingerprint": info["fingerprint"], "vae": None}
    assert len(ds) == 1500 and len(info["fingerprint"]) == 16
    assert build_dataset({"name": "digits"})[1]["fingerprint"] == info["fingerprint"]  # stable
    others = {build_dataset({"name": "digits"}, "test")[1]["fingerprint"],
              build_dataset({"name": "digits", "image_size": 16})[1]["fingerprint"]}
    assert info["fingerprint"] not in others and len(others) == 2  # content-sensitive
    flipped, _ = build_dataset({"name": "digits", "random_flip": True})
    torch.manual_seed(0)
    assert any(not torch.equal(flipped[0][0], ds[0][0]) for _ in range(20))


def test_build_rejects_bad_config():
    with pytest.raises(UserError) as e:
        build_dataset({"name": "imagenet"})
    assert DATASETS.names() and all(n in str(e.value) for n in DATASETS.names())
    with pytest.raises(UserError, match="valid keys"):
        build_dataset({"name": "digits", "imge_size": 16})
    with pytest.raises(UserError, match="path"):
        build_dataset({"name": "imagefolder", "image_size": 16})
    with pytest.raises(UserError, match="nowhere"):
        build_dataset({"name": "latents", "path": "nowhere"})
    with pytest.raises(UserError, match="image_size"):
        build_dataset({"name": "digits", "image_size": 0})


# ---------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------

def _half_image(size, dark_left=True, mode="RGB"):
    """Left half dark, right half bright (or the reverse): a flip is visible in the mean of each half."""
    w, h = size
    arr = np.full((h, w, 3), 230, np.uint8)
    arr[:, : w // 2] = 20
    if not dark_left:
        arr = arr[:, ::-1]
    return Image.fromarray(np.ascontiguousarray(arr)).convert(mode)


def _make_folder(root, per_class=3, size=(40, 30)):
    for c, cls in enumerate(["cat", "dog"]):
        os.makedirs(root / cls, exist_ok=True)
        for i in range(per_class):
            _half_image(size, dark_left=c == 0).save(root / cls / f"{i}.png")
    return root


def test_center_crop_arr_matches_adm_sizes():
    img = _half_image((64, 48))
    out = center_crop_arr(img, 16)
    assert out.size == (16, 16)
    assert np.asarray(out)[:, :4].mean() < 60 and np.asarray(out)[:, -4:].mean() > 200


def test_image_folder_shape_range_labels_and_flip(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    ds = ImageFolderDataset(str(root), 16, random_flip=False)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0 and ds[5][1] == 1
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.7 and x.max() > 0.7
    assert all(ds[0][0][:, :, :4].mean() < 0 for _ in range(5))  # never flipped
    flipping = ImageFolderDataset(str(root), 16, random_flip=True)
    torch.manual_seed(0)
    left_dark = {bool(flipping[0][0][:, :, :4].mean() < 0) for _ in range(20)}
    assert left_dark == {True, False}
    gray = ImageFolderDataset(str(root), 8, random_flip=False, channels=1)
    assert gray[0][0].shape == (1, 8, 8)


def test_image_folder_corrupt_image_names_the_file(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    bad = root / "dog" / "zz_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    good = (root / "dog" / "0.png").read_bytes()
    truncated = root / "dog" / "zz_trunc.png"
    truncated.write_bytes(good[: len(good) // 2])
    ds = ImageFolderDataset(str(root), 16)
    for path in (bad, truncated):
        index = [p for p, _ in ds.samples].index(str(path))
        with pytest.raises(UserError, match=str(path)):
            ds[index]
    ds[0]  # the good ones still load


def test_image_folder_missing_or_empty_root(tmp_path):
    with pytest.raises(UserError, match="missing_root"):
        ImageFolderDataset(str(tmp_path / "missing_root"), 16)
    (tmp_path / "empty_root" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="empty_root"):
        ImageFolderDataset(str(tmp_path / "empty_root"), 16)


def test_build_image_folder_fingerprint(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    cfg = {"name": "imagefolder", "path": str(root), "image_size": 16}
    ds, info = build_dataset(cfg)
    assert (info["channels"], info["image_size"], info["num_classes"], info["num_items"]) == (3, 16, 2, 6)
    assert build_dataset(cfg)[1]["fingerprint"] == info["fingerprint"]
    assert build_dataset({**cfg, "image_size": 8})[1]["fingerprint"] != info["fingerprint"]
    _half_image((50, 30)).save(root / "cat" / "0.png")  # same name, different content and size
    assert build_dataset(cfg)[1]["fingerprint"] != info["fingerprint"]
    with pytest.raises(UserError, match="test_path"):
        build_dataset(cfg, "test")


# ---------------------------------------------------------------------------------------------
# torchvision datasets offline
# ---------------------------------------------------------------------------------------------

TORCHVISION_NAMES = [n for n in DATASETS.names() if n in TORCHVISION_DATASETS]  # registered by data/images.py


def test_torchvision_datasets_are_registered():
    assert TORCHVISION_NAMES == list(TORCHVISION_DATASETS)


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_download_failure_is_fast_user_error(tmp_path, monkeypatch, name):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # offline, even on a machine with internet
    root = tmp_path / "tv"
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        build_dataset({"name": name, "path": str(root)})
    assert time.perf_counter() - start < 10
    msg = str(e.value)
    assert name in msg and str(root) in msg and "download" in msg and "put" in msg
    with pytest.raises(UserError, match="not found"):
        build_dataset({"name": name, "path": str(root), "download": False})


# ---------------------------------------------------------------------------------------------
# latent stores
# ---------------------------------------------------------------------------------------------

def _batches(n=25, batch=7, shape=(4, 2, 2), seed=0):
    g = np.random.default_rng(seed)
    lat = g.standard_normal((n, *shape)).astype(np.float32)
    lab = g.integers(0, 3, n)
    return lat, lab, [(lat[i: i + batch], lab[i: i + batch]) for i in range(0, n, batch)]


def _store(tmp_path, name="store", **kw):
    lat, lab, batches = _batches()
    meta = write_latent_store(str(tmp_path / name), batches, {"vae": "test-vae", "scale_factor": 0.5,
                                                               "num_classes": 3}, shard_size=10, **kw)
    return lat, lab, meta


def test_latent_store_round_trip(tmp_path):
    lat, lab, meta = _store(tmp_path)
    assert [s["count"] for s in meta["shards"]] == [10, 10, 5] and meta["count"] == 25
    store = LatentStore(str(tmp_path / "store"), verify=True)
    assert len(store) == 25 and store.shape == (4, 2, 2) and store.scale_factor == 0.5
    assert store.num_classes == 3 and store.vae == "test-vae" and not store.flip
    assert np.array_equal(store.labels, lab)
    for i in (0, 9, 10, 24, -1):
        x, y = store[i]
        assert x.dtype == torch.float32 and x.shape == (4, 2, 2) and y == lab[i]
        np.testing.assert_allclose(x.numpy(), lat[i], atol=2e-3)  # float16 storage
    with pytest.raises(IndexError):
        store[25]
    clone = pickle.loads(pickle.dumps(store))  # DataLoader workers get a copy without memory maps
    assert torch.equal(clone[12][0], store[12][0])
    exact = _store(tmp_path, "exact", dtype="float32")[2]
    assert np.array_equal(LatentStore(str(tmp_path / "exact"))[3][0].numpy(), lat[3])
    assert exact["fingerprint"] != meta["fingerprint"]
    assert _store(tmp_path, "again")[2]["fingerprint"] == meta["fingerprint"]  # stable


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))
    return meta


def test_latent_store_rejects_corruption(tmp_path):
    lat, lab, meta = _store(tmp_path)
    path = tmp_path / "store"
    _edit_meta(path, count=26)
    with pytest.raises(UserError, match="count"):
        LatentStore(str(path))
    _edit_meta(path, count=25, shape=[4, 4, 4])
    with pytest.raises(UserError, match="shape"):
        LatentStore(str(path))
    _edit_meta(path, shape=[4, 2, 2], num_classes=2)
    with pytest.raises(UserError, match="classes"):
        LatentStore(str(path))
    _edit_meta(path, num_classes=3)
    np.save(path / "shard_00001.labels.npy", lab[10:19])  # one label short
    with pytest.raises(UserError, match="label"):
        LatentStore(str(path))
    np.save(path / "shard_00001.labels.npy", lab[10:20])
    LatentStore(str(path))  # repaired
    np.save(path / "shard_00002.latents.npy", np.zeros((5, 4, 2, 2), np.float16))  # content changed
    LatentStore(str(path))  # headers still agree ...
    with pytest.raises(UserError, match="fingerprint"):
        LatentStore(str(path), verify=True)  # ... the fingerprint does not
    (path / "shard_00002.latents.npy").write_bytes(b"\x93NUMPY truncated")
    with pytest.raises(UserError, match="shard_00002"):
        LatentStore(str(path))
    os.remove(path / "shard_00002.latents.npy")
    with pytest.raises(UserError, match="missing"):
        LatentStore(str(path))
    os.remove(path / "meta.json")
    with pytest.raises(UserError, match="meta.json"):
        LatentStore(str(path))


def test_latent_store_writer_is_atomic(tmp_path):
    _, _, batches = _batches()

    def crashing():
        yield from batches[:2]
        raise RuntimeError("crash mid-extraction")

    with pytest.raises(RuntimeError):
        write_latent_store(str(tmp_path / "store"), crashing(), {"vae": "v"}, shard_size=5)
    assert not any(n.startswith("store") for n in os.listdir(tmp_path))  # no store, no .tmp-* left
    _store(tmp_path)
    with pytest.raises(UserError, match="exists"):
        _store(tmp_path)
    _, _, meta = _store(tmp_path, overwrite=True)
    assert LatentStore(str(tmp_path / "store")).fingerprint == meta["fingerprint"]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "keep.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not a latent store"):
        _store(tmp_path, "images", overwrite=True)
    assert (tmp_path / "images" / "keep.png").exists()


def _tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae.save_pretrained(path)
    return vae.eval()


def test_extract_latents_round_trip_with_tiny_vae(tmp_path):
    images = _make_folder(tmp_path / "imgs", per_class=3, size=(32, 32))
    vae = _tiny_vae(tmp_path / "vae")
    meta = extract_latents(str(images), str(tmp_path / "vae"), str(tmp_path / "lat"), image_size=32,
                           batch_size=4, flip="both", dtype="float16", shard_size=5, device="cpu", progress=False)
    assert meta["count"] == 12 and meta["flip"] and meta["scale_factor"] == 0.18215
    assert meta["flip_mode"] == "both" and meta["dtype"] == "float16"
    assert meta["shape"] == [4, 16, 16] and meta["num_classes"] == 2 and meta["classes"] == ["cat", "dog"]
    assert [s["count"] for s in meta["shards"]] == [5, 5, 2]
    store = LatentStore(str(tmp_path / "lat"))
    # each batch is stored as-is, then mirrored: labels [0,0,0,1] x2, then [1,1] x2
    assert store.labels.tolist() == [0, 0, 0, 1] * 2 + [1, 1] * 2
    # the same computation by hand: seeded posterior samples times DiT's scale factor
    pixels = ImageFolderDataset(str(images), 32, random_flip=False)
    x = torch.stack([pixels[i][0] for i in range(4)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.sample(generator=g) * 0.18215
        expected_flip = vae.encode(x.flip(-1)).latent_dist.sample(generator=g) * 0.18215
    got = torch.stack([store[i][0] for i in range(8)])
    torch.testing.assert_close(got[:4], expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got[4:], expected_flip, atol=2e-3, rtol=2e-3)

    ds, info = build_dataset({"name": "latents", "path": str(tmp_path / "lat")})
    assert info["channels"] == 4 and info["image_size"] == 16 and info["num_items"] == 12
    assert info["vae"] == {"id": str(tmp_path / "vae"), "scale_factor": 0.18215}
    assert info["num_classes"] == 2 and len(info["fingerprint"]) == 16
    with pytest.raises(UserError, match="image_size"):
        build_dataset({"name": "latents", "path": str(tmp_path / "lat"), "image_size": 64})

    _edit_meta(tmp_path / "lat", count=11)
    with pytest.raises(UserError, match="count"):
        build_dataset({"name": "latents", "path": str(tmp_path / "lat")})


def test_extract_latents_reference_mode_float32_one_randomly_flipped_copy(tmp_path):
    from fcdm_lab.rng import derive_seed

    images = _make_folder(tmp_path / "imgs", per_class=4, size=(32, 32))
    vae = _tiny_vae(tmp_path / "vae")
    meta = extract_latents(str(images), str(tmp_path / "vae"), str(tmp_path / "lat"), image_size=32,  # defaults
                           batch_size=3, seed=5, device="cpu", progress=False)
    assert meta["dtype"] == "float32" and meta["flip_mode"] == "random" and meta["count"] == 8  # one per image
    store = LatentStore(str(tmp_path / "lat"))
    assert store.flip_mode == "random" and store.labels.tolist() == [0] * 4 + [1] * 4
    # by hand: per image a uniform draw from the documented stream decides the mirror
    pixels = ImageFolderDataset(str(images), 32, random_flip=False)
    x = torch.stack([pixels[i][0] for i in range(8)])
    mirrored = torch.rand(8, generator=torch.Generator().manual_seed(derive_seed(5, 1))) < 0.5
    assert 0 < int(mirrored.sum()) < 8  # both kinds occur in this draw
    x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        expected = torch.cat([vae.encode(x[i:i + 3]).latent_dist.sample(generator=g) for i in range(0, 8, 3)])
    got = torch.stack([store[i][0] for i in range(8)])
    torch.testing.assert_close(got, expected * 0.18215, atol=1e-5, rtol=1e-5)  # float32: no fp16 rounding
    with pytest.raises(UserError, match="flip mode.*random, none, both"):
        extract_latents(str(images), str(tmp_path / "vae"), str(tmp_path / "x"), flip="sometimes", progress=False)


def test_vae_load_failures_say_pass_a_local_directory(tmp_path, monkeypatch):
    start = time.perf_counter()
    with pytest.raises(UserError, match="does not exist"):
        load_vae(str(tmp_path / "no_vae_here"))
    with pytest.raises(UserError, match="local directory"):
        load_vae("stabilityai/sd-vae-ft-ema")  # HF_HUB_OFFLINE=1 in the test session
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub.*local directory"):
        load_vae("stabilityai/sd-vae-ft-ema")
    (tmp_path / "not_a_vae").mkdir()
    with pytest.raises(UserError, match="not_a_vae"):
        load_vae(str(tmp_path / "not_a_vae"))
    assert time.perf_counter() - start < 20  # includes importing diffusers on a busy machine
