"""Per-epoch metrics that outlive a tracking server going away for a while."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segx.errors import SegxError


class EpochLog:
    """Per-epoch metrics that outlive a tracking server going away for a while.

    Each epoch's metrics are sent together with any that failed before, in order, each with its
    own step and timestamp (a metric sent twice is the same row, so a lost answer duplicates
    nothing). What the store did not take stays in memory and in ``spool`` (a JSON file beside
    the checkpoint, so a resumed run sends it too) and training goes on. A send is one request
    without MLflow's retries, so an outage costs an epoch at most a few seconds.
    """

    def __init__(self, client: MlflowClient, run_id: str, spool: Path | None = None):
        self.client, self.run_id, self.spool = client, run_id, spool
        self.pending: list[list] = []  # [key, value, timestamp_ms, step], oldest first
        if spool is not None and spool.exists():
            with contextlib.suppress(OSError, ValueError):
                self.pending = [list(m) for m in json.loads(spool.read_text())]
        self.failing: str | None = None  # why the last send failed

    def log(self, metrics: Mapping[str, float], step: int) -> bool:
        now = int(time.time() * 1000)
        self.pending += [[k, float(v), now, int(step)] for k, v in metrics.items()]
        return self.send()

    def send(self) -> bool:
        """Send what is pending; False if the store did not take it (it is kept)."""
        while self.pending:
            chunk = self.pending[:1000]  # MLflow's limit per log_batch
            try:
                with _one_quick_request():
                    self.client.log_batch(self.run_id, metrics=[Metric(*m) for m in chunk])
            except Exception as exc:
                if not _store_unavailable(exc):
                    raise
                if self.failing is None:
                    print(
                        f"segx: warning: MLflow at {self.client.tracking_uri} did not take run {self.run_id}'s "
                        f"metrics ({_first_line(exc)}); training goes on and sends them with the next "
                        "epoch's",
                        file=sys.stderr,
                        flush=True,
                    )
                self.failing = _first_line(exc)
                self._save()
                return False
            del self.pending[: len(chunk)]
        if self.failing is not None:
            print(
                f"segx: MLflow at {self.client.tracking_uri} answers again; every kept metric is sent",
                file=sys.stderr,
                flush=True,
            )
            self.failing = None
        self._save()
        return True

    def flush(self, wait_s: float, then: str) -> None:
        """Send what is pending, trying for up to ``wait_s`` seconds; then a SegxError ending
        with ``then`` (what the user does next)."""
        deadline = time.monotonic() + wait_s
        while not self.send():
            if time.monotonic() >= deadline:
                raise SegxError(
                    f"MLflow at {self.client.tracking_uri} has not taken run {self.run_id}'s last "
                    f"{len(self.pending)} metrics for {wait_s:.0f} s ({self.failing}); {then}"
                )
            time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))

    def _save(self) -> None:
        if self.spool is None:
            return
        if not self.pending:
            self.spool.unlink(missing_ok=True)
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spool.with_name(f"{self.spool.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.pending))
        os.replace(tmp, self.spool)  # atomic: a kill leaves the old list or the new one


def _first_line(exc: BaseException) -> str:
    """Why a request failed, briefly (MLflow's own text for a refused connection runs to 400
    characters)."""
    text = str(exc).strip()
    for needle, short in (
        ("Connection refused", "connection refused"),
        ("timed out", "no answer in time"),
        ("Name or service not known", "unknown host"),
    ):
        if needle in text:
            return short
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _store_unavailable(exc: Exception) -> bool:
    """A store that is away, overloaded or locked (worth trying again), not one that refuses the
    request (an unknown run, a bad value: trying again would not help)."""
    import requests

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(exc, (OSError, requests.RequestException))


@contextlib.contextmanager
def _one_quick_request() -> Iterator[None]:
    """One attempt, answered within 10 s at most, whatever the user set for MLflow's retries (it
    reads these variables for every request): the caller keeps what failed and tries later."""
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        timeout = min(10, max(1, int(saved["MLFLOW_HTTP_REQUEST_TIMEOUT"] or 10)))
    except ValueError:
        timeout = 10
    os.environ.update(dict(zip(keys, ("0", "0", str(timeout)), strict=True)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
