"""fcdm-lab: ablations and experiment tracking for FCDM.

The Python API (README "Python API"): `train`, `load_model`, `sample`, `run_ablation` and
`FCDMPipeline`. They are imported on first use, so `import fcdm_lab` stays light (no torch, MLflow,
Optuna or torch-fidelity until a function needs them).
"""
__version__ = "0.1.0"

_LAZY = {
    "train": "fcdm_lab.train",  # the subpackage, callable: fcdm_lab.train(...) runs fcdm_lab.api.train
    "load_model": "fcdm_lab.api",
    "sample": "fcdm_lab.api",
    "run_ablation": "fcdm_lab.api",
    "FCDMPipeline": "fcdm_lab.diffusers_pipeline",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    # PEP 562 lazy attributes: the heavy libraries load when a name is first used.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fcdm_lab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
