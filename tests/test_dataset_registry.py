"""The dataset registry: every registered dataset is well declared, and a dataset registered from
outside the package (here, in the test) is built and trained on with no other change."""
import ast
import hashlib
import uuid
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import fcdm_lab.data
from fcdm_lab.data import DATASETS, DataRequest, DataSplit, build_dataset
from fcdm_lab.data.build import CONFIG_KEYS, RandomFlip
from fcdm_lab.data.registry import DatasetSpec, dataset_spec
from fcdm_lab.errors import UserError

# ---- every registered dataset -------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS.names())
def test_registered_dataset_is_well_declared(name):
    spec = dataset_spec(name)  # a misspelt registration keyword is a TypeError here
    assert isinstance(spec, DatasetSpec) and callable(spec.build)
    assert spec.random_flip in (True, False, None)
    assert spec.path is None or (isinstance(spec.path, str) and spec.path)
    assert spec.requires_image_size is None or (isinstance(spec.requires_image_size, str)
                                                and spec.requires_image_size)


def test_unknown_dataset_lists_the_registry():
    with pytest.raises(UserError, match=r"unknown dataset 'imagenet'; valid names: ") as e:
        build_dataset({"name": "imagenet"})
    assert str(e.value).endswith(", ".join(DATASETS.names()))
    assert {"digits", "fashion-mnist", "imagefolder", "mnist", "cifar10", "latents"} <= set(DATASETS.names())


@pytest.mark.parametrize("name", [n for n in DATASETS.names() if dataset_spec(n).path])
def test_datasets_with_a_folder_per_split_require_it(name, tmp_path):
    what = dataset_spec(name).path
    with pytest.raises(UserError, match=rf"data.path \(the {what}\) is required for dataset '{name}'$"):
        build_dataset({"name": name, "image_size": 8})
    with pytest.raises(UserError, match=rf"data.test_path \(the {what}\) is required .* on the test split"):
        build_dataset({"name": name, "image_size": 8, "path": str(tmp_path)}, "test")
    with pytest.raises(UserError, match="does not exist"):
        build_dataset({"name": name, "image_size": 8, "path": str(tmp_path / "missing")})


def test_data_modules_import_no_cycle():
    """The import graph among fcdm_lab.data's modules (deferred imports included) has no cycle; the
    package's __init__ only re-exports."""
    folder = Path(fcdm_lab.data.__file__).parent
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    edges = {}
    for stem in modules:
        tree = ast.parse((folder / f"{stem}.py").read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = node.module if node.level == 0 else f"fcdm_lab.data.{node.module}"
                if module == "fcdm_lab.data":  # from fcdm_lab.data import <submodule>
                    deps |= {a.name for a in node.names if a.name in modules}
                    assert all(a.name in modules for a in node.names), f"{stem} imports the package __init__"
                elif module.startswith("fcdm_lab.data."):
                    deps.add(module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names if a.name.startswith("fcdm_lab.data.")}
        edges[stem] = deps & modules

    def visit(stem, path):
        assert stem not in path, f"import cycle: {' -> '.join([*path, stem])}"
        for dep in edges[stem]:
            visit(dep, [*path, stem])

    for stem in modules:
        visit(stem, [])
    assert edges["registry"] == set()  # the bottom: every dataset module imports it


# ---- a dataset registered in the test -----------------------------------------------------------

N_TRAIN, N_TEST = 48, 16
BUILT = []  # the requests the dummy builder was given


def _build_noise(req: DataRequest) -> DataSplit:
    """Random 8x8 grayscale images in [-1, 1], 10 classes; a different draw per split."""
    BUILT.append(req)
    n = N_TRAIN if req.split == "train" else N_TEST
    g = torch.Generator().manual_seed(0 if req.split == "train" else 1)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(n) % 10
    return DataSplit(TensorDataset(x, y), channels=1, image_size=8, num_classes=10,
                     fingerprint=hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16])


@pytest.fixture
def noise():
    """A throwaway dataset under a unique name, with a random flip by default; removed afterwards."""
    name = f"noise-{uuid.uuid4().hex[:8]}"
    DATASETS.register(name, random_flip=True)(_build_noise)
    BUILT.clear()
    yield name
    DATASETS.unregister(name)


def test_registered_dataset_builds_with_the_right_info(noise):
    ds, info = build_dataset({"name": noise})
    assert info == {"name": noise, "channels": 1, "image_size": 8, "num_classes": 10, "num_items": N_TRAIN,
                    "fingerprint": info["fingerprint"], "vae": None}
    assert len(info["fingerprint"]) == 16 and int(info["fingerprint"], 16) >= 0
    assert BUILT[-1] == DataRequest(split="train", image_size=None, random_flip=True, path=None, download=None)
    # the builder returned no flip of its own (DataSplit.flipped false): build_dataset adds RandomFlip
    assert isinstance(ds, RandomFlip) and len(ds) == N_TRAIN
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and int(y) == 0
    torch.manual_seed(0)
    assert any(not torch.equal(ds[0][0], ds.base[0][0]) for _ in range(20))

    test, test_info = build_dataset({"name": noise, "path": "/somewhere", "download": True}, "test")
    assert not isinstance(test, RandomFlip) and test_info["num_items"] == N_TEST  # never flipped on test
    assert test_info["fingerprint"] != info["fingerprint"]
    assert BUILT[-1] == DataRequest(split="test", image_size=None, random_flip=False, path="/somewhere",
                                    download=True)
    plain, _ = build_dataset({"name": noise, "random_flip": False, "image_size": 8})
    assert isinstance(plain, TensorDataset) and BUILT[-1].image_size == 8
    # the shared checks still come first
    with pytest.raises(UserError, match="valid keys"):
        build_dataset({"name": noise, "imge_size": 8})
    with pytest.raises(UserError, match="image_size"):
        build_dataset({"name": noise, "image_size": 0})
    with pytest.raises(UserError, match="valid splits"):
        build_dataset({"name": noise}, "val")
    with pytest.raises(UserError, match=rf"valid names: .*{noise}"):
        build_dataset({"name": "nope"})
    assert set(CONFIG_KEYS) >= {"name", "path", "random_flip", "image_size"}


def test_registration_is_checked_and_removable(noise):
    with pytest.raises(ValueError, match="duplicate dataset name"):
        DATASETS.register(noise)(_build_noise)
    typo = f"{noise}-typo"
    DATASETS.register(typo, random_flips=True)(_build_noise)
    try:
        with pytest.raises(TypeError, match="random_flips"):
            build_dataset({"name": typo})
    finally:
        DATASETS.unregister(typo)
    assert typo not in DATASETS
    with pytest.raises(UserError, match="unknown dataset"):
        build_dataset({"name": typo})


def test_registered_dataset_trains(noise, tmp_path):
    from fcdm_lab.config import config_from_dict
    from fcdm_lab.training.trainer import train

    cfg = config_from_dict({"name": "t", "model": {"name": "FCDM", "L": 1, "C": 8}, "data": {"name": noise},
                            "train": {"steps": 2, "batch_size": 8, "threads": 1, "sample_every": 0},
                            "eval": {"sampler": "ddim", "steps": 2, "metrics": ["fid_digits"]}})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 2 and Path(result.checkpoint).is_file()
    assert result.data_info == {"name": noise, "channels": 1, "image_size": 8, "num_classes": 10,
                                "num_items": N_TRAIN, "fingerprint": result.data_info["fingerprint"], "vae": None}
    kw = result.model_info["kwargs"]  # the model was sized from the dataset's info
    assert (kw["in_channels"], kw["input_size"], kw["num_classes"]) == (1, 8, 10)
    assert BUILT and BUILT[0].split == "train" and BUILT[0].random_flip
