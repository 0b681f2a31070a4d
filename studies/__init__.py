"""Bundled study and sweep files (shipped as the package fcdm_lab.bundled.studies; see setup.py)."""
