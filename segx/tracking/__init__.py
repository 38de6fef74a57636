"""Everything segx asks of MLflow, behind one facade. No TensorFlow here.

The parts, each a module of its own:

* :mod:`~segx.tracking.store`: the store, checked before any work (an SQLite file must be an
  MLflow database of this MLflow's schema, writable for commands that write, not locked for
  longer than ``SEGX_STORE_TIMEOUT`` seconds; a server must answer), and experiments;
* :mod:`~segx.tracking.runs`: runs that always end with their real status, what is logged to
  them and read back;
* :mod:`~segx.tracking.epochs`: per-epoch metrics that outlive a server going away;
* :mod:`~segx.tracking.logged_models`: MLflow 3 logged models of members and exports;
* :mod:`~segx.tracking.tags` and :mod:`~segx.tracking.readers`: the tag names, written once,
  and typed views of member and ensemble runs;
* :mod:`~segx.tracking.cv`, :mod:`~segx.tracking.provenance`, :mod:`~segx.tracking.pyfunc_model`:
  cross-validation parents, where a run came from, the pyfunc models MLflow serves.

Default store: SQLite at ``outputs/mlflow.db`` with artifacts under ``outputs/mlartifacts``
(MLflow 3 refuses a bare ``./mlruns`` file store). A remote ``http(s)://`` URI works the same.
Importing this package changes nothing: :func:`connect` sets MLflow's environment defaults.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Where each name of the facade lives. Loaded on first use (PEP 562), so that a module of this
# package that needs no MLflow (the tracking server's supervisor, the tag names) can be imported
# without MLflow's import time and memory (about 180 MB).
_HOMES = {
    "EpochLog": "epochs",
    "TensorSignature": "logged_models",
    "link_models": "logged_models",
    "log_export_model": "logged_models",
    "log_member_model": "logged_models",
    **dict.fromkeys(
        (
            "_unscoped",
            "download",
            "download_member_model",
            "end_unscoped",
            "find_runs",
            "flatten",
            "get_run",
            "log_artifact",
            "log_dataset",
            "log_metrics",
            "log_params",
            "reopen_run",
            "run_scope",
            "set_tags",
            "start_run",
            "system_metrics",
        ),
        "runs",
    ),
    **dict.fromkeys(
        (
            "EXPERIMENT_KIND",
            "STORE_TIMEOUT_S",
            "artifact_folder_name",
            "check_model_name",
            "configure_mlflow_environment",
            "connect",
            "experiment_id",
            "ui_urls",
        ),
        "store",
    ),
    "ROLE": "tags",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'segx.tracking' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"segx.tracking.{home}"), name)
    globals()[name] = value  # looked up once
    return value


if TYPE_CHECKING:  # the names, for type checkers and editors
    from segx.tracking.epochs import EpochLog
    from segx.tracking.logged_models import TensorSignature, link_models, log_export_model, log_member_model
    from segx.tracking.runs import (
        _unscoped,
        download,
        download_member_model,
        end_unscoped,
        find_runs,
        flatten,
        get_run,
        log_artifact,
        log_dataset,
        log_metrics,
        log_params,
        reopen_run,
        run_scope,
        set_tags,
        start_run,
        system_metrics,
    )
    from segx.tracking.store import (
        EXPERIMENT_KIND,
        STORE_TIMEOUT_S,
        artifact_folder_name,
        check_model_name,
        configure_mlflow_environment,
        connect,
        experiment_id,
        ui_urls,
    )
    from segx.tracking.tags import ROLE

__all__ = [
    "EXPERIMENT_KIND",
    "ROLE",
    "STORE_TIMEOUT_S",
    "EpochLog",
    "TensorSignature",
    "_unscoped",
    "artifact_folder_name",
    "check_model_name",
    "configure_mlflow_environment",
    "connect",
    "download",
    "download_member_model",
    "end_unscoped",
    "experiment_id",
    "find_runs",
    "flatten",
    "get_run",
    "link_models",
    "log_artifact",
    "log_dataset",
    "log_export_model",
    "log_member_model",
    "log_metrics",
    "log_params",
    "reopen_run",
    "run_scope",
    "set_tags",
    "start_run",
    "system_metrics",
    "ui_urls",
]
