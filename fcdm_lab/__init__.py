"""fcdm-lab: ablations and experiment tracking for FCDM."""
__version__ = "0.1.0"
