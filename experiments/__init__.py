"""Bundled experiment files (shipped as the package fcdm_lab.bundled.experiments; see setup.py)."""
