"""Training (accelerate; exact resume; paired seeds) and sampling from checkpoints."""
from .checkpoint import find_latest_checkpoint, list_checkpoints, read_checkpoint
from .sampling import generate, load_checkpoint, objective_for, sample_checkpoint
from .trainer import TrainingDiverged, TrainResult, train

__all__ = ["TrainResult", "TrainingDiverged", "find_latest_checkpoint", "generate", "list_checkpoints",
           "load_checkpoint", "objective_for", "read_checkpoint", "sample_checkpoint", "train"]


class _TrainPackage(__import__("types").ModuleType):
    """`fcdm_lab.train(...)` is the public API's `fcdm_lab.api.train`: Python binds the name
    `fcdm_lab.train` to this package once it is imported, so the package itself forwards calls."""

    def __call__(self, *args, **kwargs):
        from ..api import train as api_train

        return api_train(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _TrainPackage
