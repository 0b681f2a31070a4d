"""`python -m fcdm_lab ...` and `accelerate launch -m fcdm_lab train ...`."""
from .cli import main

main()
