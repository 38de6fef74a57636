"""The names segx writes on MLflow runs, written once. Readers (:mod:`segx.tracking.readers`)
and writers import them from here; the data fingerprint's own tags are named by the data stage
(``segx.data.split.FINGERPRINT_TAGS``), which knows nothing of MLflow."""

ROLE = "segx.role"  # "member", "ensemble", "cv" (a cross-validated member's parent), "export"
BACKBONE = "segx.backbone"
ARCH = "segx.arch"
CONFIG_HASH = "segx.config_hash"  # what resume=auto and the folds of one configuration match on
DATA_FINGERPRINT = "segx.data_fingerprint"
CV_FINGERPRINT = "segx.cv_fingerprint"
COMMAND = "segx.command"  # the command line that ran
OVERRIDES = "segx.overrides"  # JSON list: the command's own overrides
REPRODUCE = "segx.reproduce"  # the command that rebuilds the run's config (segx.info prints it)
MODEL_ARTIFACT = "segx.model_artifact"
LOGGED_MODEL_ID = "segx.logged_model_id"
PYFUNC_URI = "segx.pyfunc_uri"
ENSEMBLES = "segx.ensembles"  # on a member: the ensemble runs that use it
FOLDS = "segx.folds"
FAILURE = "segx.failure"  # why a run FAILED, in one line
DISK_FULL = "segx.disk_full"  # "true": the disk filled; the run can be resumed once there is room
RESUMED = "segx.resumed"
GIT_SHA = "segx.git_sha"
GIT_DIRTY = "segx.git_dirty"
FOLD = "segx.fold"
CV_PARENT = "segx.cv_parent"  # on a fold run: its cross-validated configuration's parent run
CV_CONFIG_HASH = "segx.cv_config_hash"
EXPORT = "segx.export."  # + format, on an ensemble run: the export's child run ID
LABELS = (
    "segx.labels"  # several classes: JSON of data.labels as segx reads them (names, values, palette, ignore, flip swap)
)
VOLUMES = "segx.volumes"  # trained on volumes: the slice folder's key; model/volumes.json holds the plan
