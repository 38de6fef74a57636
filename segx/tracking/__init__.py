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
