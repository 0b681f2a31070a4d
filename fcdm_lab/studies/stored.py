"""What a study's parent run holds in MLflow, read by every report (ablation and scaling): its
study.json (the spec and plan it ran with) and its child runs."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Dict

from ..errors import UserError

STUDY_FILE = "study.json"


def read_study_file(client, run_id: str) -> Dict[str, Any]:
    """The study.json artifact of a study's parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, STUDY_FILE, tmp)
        except Exception:
            raise UserError(f"run {run_id} has no {STUDY_FILE} artifact: it was not written by a study") from None
        return json.loads(Path(local).read_text())


def study_children(client, parent):
    """Every child run of a study parent (any status), newest first."""
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                              order_by=["attributes.start_time DESC"], max_results=10000)


__all__ = ["STUDY_FILE", "read_study_file", "study_children"]
