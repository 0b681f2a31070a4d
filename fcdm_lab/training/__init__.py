"""Training, one job per module: the loop (trainer.py), the state an exact resume needs and its
checkpoint files (state.py), the hooks that attach sample grids, the run folder's files and
tracking to the loop (hooks.py), and the checks made before anything is written (preflight.py).
Import from the module that does the job; this package re-exports nothing.
"""
