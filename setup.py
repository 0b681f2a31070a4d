"""Package layout only (metadata lives in pyproject.toml).

The bundled experiment and study files stay in the project's top-level folders experiments/ and
studies/, and ship inside the package as the data packages fcdm_lab.bundled.experiments and
fcdm_lab.bundled.studies (found with importlib.resources, in wheels and editable installs alike).
pyproject.toml alone cannot add mapped packages to an automatic package search, hence this file.
"""
from setuptools import find_packages, setup

BUNDLED = {"fcdm_lab.bundled.experiments": "experiments", "fcdm_lab.bundled.studies": "studies"}

setup(packages=[*find_packages(include=["fcdm_lab", "fcdm_lab.*"]), *BUNDLED], package_dir=BUNDLED)
