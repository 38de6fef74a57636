"""The one module that configures and imports TensorFlow, Keras and segmentation_models.

Decision: segx runs on **tf-keras** (Keras 2 API, ``TF_USE_LEGACY_KERAS=1``), not Keras 3.
segmentation-models 1.0.1 was written against the Keras 2 API; under tf-keras every encoder
it offers builds (densenet too, which fails under Keras 3) and models save to and load from
the ``.keras`` format in safe mode. segmentation_models reads ``SM_FRAMEWORK`` at import time
and injects Keras submodules into its globals, so the environment is set here, before the
first import, and nothing else in segx imports TensorFlow, Keras or segmentation_models.
"""

from __future__ import annotations

import logging
import os
import warnings

# Must precede the first TensorFlow import anywhere in the process.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ["SM_FRAMEWORK"] = "tf.keras"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ info/warning spam (cuInit, oneDNN)
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*np.object.*")

import contextlib  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402


@contextlib.contextmanager
def _quiet_native_stderr():
    """TF 2.21 logs through absl at import (oneDNN, CUDA probing) and ignores
    TF_CPP_MIN_LOG_LEVEL for those lines; silence file descriptor 2 for the import only."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _quiet_native_stderr():
    import tensorflow as tf  # noqa: E402
    import tf_keras as keras  # noqa: E402

    tf.config.list_physical_devices("GPU")  # the CUDA probe logs once, here

tf.get_logger().setLevel(logging.ERROR)
try:  # absl prints "triggered tf.function retracing" etc. at WARNING
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
except ImportError:  # pragma: no cover
    pass

with contextlib.redirect_stdout(io.StringIO()):  # "Segmentation Models: using `tf.keras`..."
    import segmentation_models as sm  # noqa: E402

__all__ = ["tf", "keras", "sm"]
