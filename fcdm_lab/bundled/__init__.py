"""The bundled experiment and study files, found through importlib.resources.

In the source tree they are the top-level folders experiments/ and studies/; setup.py maps them into
this package as `fcdm_lab.bundled.experiments` and `fcdm_lab.bundled.studies`, so a built wheel
ships them and bundled names work in any install, not only an editable one.
"""
from importlib.resources import files
from pathlib import Path

# pip installs unpack to a folder, so these are real paths (zip imports are not supported)
EXPERIMENTS_DIR = Path(str(files(f"{__name__}.experiments")))
STUDIES_DIR = Path(str(files(f"{__name__}.studies")))
