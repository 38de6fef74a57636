"""A shared MLflow tracking server, as a team runs one: PostgreSQL holds the runs, and the server
proxies the artifacts (``--serve-artifacts``), so clients need no shared filesystem.

    python -m segx.server                 # or: make server; Ctrl-C stops MLflow, then PostgreSQL
    python -m segx.train mlflow.tracking_uri=http://127.0.0.1:5001 ...

This module is the command (its config, ``conf/server.yaml``, read and checked once); the
supervisor that starts, watches and stops PostgreSQL and MLflow is :mod:`segx.tracking.server`.
"""

from __future__ import annotations

import os
import sys

import hydra

from segx import cli
from segx.config import CONF_PATH
from segx.errors import SegxError
from segx.tracking.server import OWN_OPTIONS, ServerSettings, serve


def run_server(cfg) -> None:
    from segx.config import require_int

    require_int(cfg, "port", 1, 65535)
    # Each MLflow worker is a process of about 1 GB (experiments/ui_memory): a few per core.
    require_int(cfg, "workers", 1, max(4, 4 * (os.cpu_count() or 1)))
    if cfg.postgres_port is not None:
        require_int(cfg, "postgres_port", 1, 65535)
    if not isinstance(cfg.timeout, (int, float)) or isinstance(cfg.timeout, bool) or cfg.timeout <= 0:
        raise SegxError(f"timeout={cfg.timeout!r} must be a number of seconds > 0")
    extra = [str(a) for a in (cfg.extra_args or [])]
    for arg in extra:  # segx sets these itself: another value would make the banner (and the tests) lie
        name = arg.split("=", 1)[0]
        if name in OWN_OPTIONS:
            key = OWN_OPTIONS[name]
            raise SegxError(
                f"extra_args sets {name}, which segx.server sets itself"
                + (f"; use {key}=... instead" if key else "; remove it (the store is PostgreSQL, artifacts proxied)")
            )
    settings = ServerSettings(
        str(cfg.host), int(cfg.port), float(cfg.timeout), cfg.postgres_port, cfg.postgres_bin, int(cfg.workers), extra
    )
    serve(str(cfg.folder), settings)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="server")
@cli.task
def _hydra_main(cfg) -> None:
    run_server(cfg)


def main() -> None:
    cli.run(_hydra_main, "server")


if __name__ == "__main__":
    sys.exit(main())
