"""fcdm-lab: ablations, scaling studies and experiment tracking for FCDM.

The Python API (README "Python API"): `train`, `load_model`, `sample`, `run_ablation` (fcdm_lab/api.py;
`import fcdm_lab` stays light: torch, MLflow and Optuna load when a function needs them). The diffusers
pipeline is `from fcdm_lab.diffusers_pipeline import FCDMPipeline` (it imports diffusers and torch).
"""
from .api import load_model, run_ablation, sample, train

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "run_ablation", "sample", "train"]
