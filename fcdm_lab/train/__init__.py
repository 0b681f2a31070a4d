"""Training (accelerate; exact resume; paired seeds) and sampling from checkpoints."""
from .checkpoint import find_latest_checkpoint, list_checkpoints, read_checkpoint
from .sampling import generate, load_checkpoint, objective_for, sample_checkpoint
from .trainer import TrainingDiverged, TrainResult, train

__all__ = ["TrainResult", "TrainingDiverged", "find_latest_checkpoint", "generate", "list_checkpoints",
           "load_checkpoint", "objective_for", "read_checkpoint", "sample_checkpoint", "train"]
