"""Creating or joining a study: its Optuna study and its one MLflow parent run, raced safely.

    study, parent_id, created = open_study(storage, "ablate-grn-vs-cca-1a2b", client=client, uri=uri, ...)

Every kind of study (ablation, scaling, search) goes through `open_study`. Workers started at
once may all try to create the study: each makes a parent run, but only the one whose
`create_study` succeeds keeps it (the storage's unique study name decides); the others delete
theirs and join. The creator writes the parent run's id into the Optuna study's user attributes
LAST, so a joiner that finds the id finds everything else the creator set up too.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

from ..errors import UserError
from ..tracking.client import DEFAULT_EXPERIMENT, experiment_id
from ..urls import redact, without_password

PARENT_ATTR = "mlflow_parent_run_id"       # Optuna study user attrs shared by every worker
URI_ATTR = "mlflow_tracking_uri"           # the tracking store, without its password


def wait_for(study, attr: str, timeout_s: float = 30.0):
    """A user attribute of the study, polling briefly: a concurrent creator may be writing it."""
    deadline = time.time() + timeout_s
    while True:
        value = study.user_attrs.get(attr)  # read from the storage on every access
        if value or time.time() > deadline:
            return value
        time.sleep(0.5)


def check_parent_reachable(client, study, parent: str, uri: str, what: str) -> None:
    """A worker joining a study must see the parent MLflow run its creator made: the same store."""
    try:
        client.get_run(parent)
    except Exception:
        where = study.user_attrs.get(URI_ATTR, "the creator's URI")
        raise UserError(f"the {what}'s parent MLflow run {parent} is not in {redact(uri)}; workers must share one "
                        f"tracking store: pass --tracking-uri {where}") from None


def new_parent_run(client, name: str, tags: Dict[str, Any], experiment: str = DEFAULT_EXPERIMENT) -> str:
    """A study's parent MLflow run, its tags resolved as MLflow does."""
    from mlflow.tracking.context.registry import resolve_tags  # mlflow: seconds; only where runs are made

    run = client.create_run(experiment_id(client, experiment), run_name=name,
                            tags=resolve_tags({k: str(v) for k, v in tags.items() if v is not None}))
    return run.info.run_id


def open_study(storage, study_name: str, *, client, uri: str, storage_text: str, what: str,
               make_parent: Callable[[], str], create: Dict[str, Any],
               on_create: Callable[[Any, str], None], on_join: Optional[Callable[[Any], None]] = None,
               adopt: bool = False) -> tuple:
    """(study, parent run id, created). `create`: optuna.create_study's arguments besides the name and
    storage (direction(s), sampler, pruner); `on_create(study, parent)`: what the creator sets up
    (attributes, queued trials) before the parent id is published; `on_join(study)`: checks a joiner
    makes (raise a UserError when the stored study was made from other settings). adopt: a study
    without a parent id (made by other means, or whose creator died first) gets a new parent; else
    that is a UserError saying how to start over."""
    import optuna  # ~0.4 s: only commands that run a study load it
    from optuna.exceptions import DuplicatedStudyError

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        study = None
    if study is None:
        parent = make_parent()
        try:
            study = optuna.create_study(study_name=study_name, storage=storage, **create)
        except DuplicatedStudyError:
            client.delete_run(parent)
            study = optuna.load_study(study_name=study_name, storage=storage)
        else:
            study.set_user_attr(URI_ATTR, without_password(uri))
            on_create(study, parent)
            study.set_user_attr(PARENT_ATTR, parent)  # last: joiners wait for it, then find everything
            return study, parent, True
    if on_join is not None:
        on_join(study)
    parent = wait_for(study, PARENT_ATTR)
    if parent is None:
        if not adopt:
            raise UserError(f"Optuna study {study_name!r} in {storage_text} has no MLflow parent run id (its creator "
                            f"died while setting it up); delete it (`optuna delete-study --study-name {study_name} "
                            f"--storage URL`) and run again")
        parent = make_parent()
        study.set_user_attr(PARENT_ATTR, parent)
        study.set_user_attr(URI_ATTR, without_password(uri))
    check_parent_reachable(client, study, parent, uri, what)
    return study, parent, False


__all__ = ["PARENT_ATTR", "URI_ATTR", "check_parent_reachable", "new_parent_run", "open_study", "wait_for"]
