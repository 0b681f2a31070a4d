"""Training (accelerate; exact resume; paired seeds) and its checkpoints. Sampling from checkpoints
lives in fcdm_lab.inference."""
from .checkpoint import find_latest_checkpoint, list_checkpoints, read_checkpoint
from .trainer import TrainingDiverged, TrainResult, train

__all__ = ["TrainResult", "TrainingDiverged", "find_latest_checkpoint", "list_checkpoints", "read_checkpoint",
           "train"]


class _TrainPackage(__import__("types").ModuleType):
    """`fcdm_lab.train(...)` is the public API's `fcdm_lab.api.train`: Python binds the name
    `fcdm_lab.train` to this package once it is imported, so the package itself forwards calls."""

    def __call__(self, *args, **kwargs):
        from ..api import train as api_train

        return api_train(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _TrainPackage
