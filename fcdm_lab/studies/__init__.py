"""Ablation studies: study files, running them as tracked MLflow runs, reports, reruns.

    from fcdm_lab.studies import run_ablation, build_report
    result = run_ablation("grn-vs-cca")
    print(build_report(result.parent_run_id).markdown())
"""
from .ablate import ChildOutcome, StudyResult, print_studies, run_ablation, studies_table
from .report import Report, build_report, write_report
from .rerun import RerunResult, rerun
from .spec import StudySpec, Variant, list_studies, load_study, plan_study, study_names

__all__ = ["ChildOutcome", "Report", "RerunResult", "StudyResult", "StudySpec", "Variant", "build_report",
           "list_studies", "load_study", "plan_study", "print_studies", "rerun", "run_ablation", "studies_table",
           "study_names", "write_report"]
