"""Studies, one job per module: study files (spec.py, sweep_file.py), creating or joining a study
(study.py), the engine's worker loop (engine.py) and where workers run (launchers.py), the kinds
of study (ablate.py: variants x seeds, also --until-decided; sweep.py: Optuna searches), the
statistics (verdicts.py, sequential.py, scaling.py, paper.py), reports (report.py, report_html.py,
sweep_results.py), storages (storage.py) and reruns (rerun.py). This package re-exports nothing.
"""
