"""The DSB2018 study: accuracy of members and ensembles, and where the time goes.

    python -m segx.bench                  # full study -> experiments/dsb2018/RESULTS.md
    python -m segx.bench profile=quick    # every stage on a subset, in minutes
    python -m segx.bench stages='[throughput]'   # one stage again

Each stage writes ``<results_dir>/<stage>.json`` as soon as it finishes and RESULTS.md is
rebuilt from whatever stages exist, so a failed stage never discards earlier measurements.
Everything is also logged to one MLflow run (``segx.role=bench``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from segx import cli
from segx.benchmark.study import STAGES, Study, check_dataset, machine
from segx.config import CONF_PATH
from segx.errors import SegxError


def run_study(cfg: DictConfig) -> Path:
    study = Study(cfg)
    check_dataset(study.dataset)
    stages = list(cfg.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SegxError(f"unknown stage '{unknown[0]}'; stages are {', '.join(STAGES)}")
    study.results.mkdir(parents=True, exist_ok=True)
    (study.results / "machine.json").write_text(json.dumps(machine(), indent=1))
    from segx import tracking
    from segx.tracking.provenance import provenance_tags

    client = tracking.connect(str(cfg.mlflow.tracking_uri))
    experiment = tracking.experiment_id(client, str(cfg.mlflow.experiment_name), cfg.mlflow.artifact_root)
    run_id = tracking.start_run(
        client, experiment, f"bench-{cfg.profile.name}", {tracking.ROLE: "bench", **provenance_tags()}
    )
    failures = []
    with tracking.run_scope(client, run_id):
        for stage in stages:
            print(f"segx bench: stage '{stage}'", flush=True)
            t0 = time.perf_counter()
            try:
                payload = getattr(study, stage)()
            except SegxError as exc:
                failures.append(f"{stage}: {exc}")
                print(f"segx bench: stage '{stage}' failed: {exc}", file=sys.stderr, flush=True)
                continue
            except Exception as exc:  # keep the stages already measured, report, go on
                logging.exception("stage %s failed", stage)
                failures.append(f"{stage}: {type(exc).__name__}: {exc}")
                continue
            payload["stage_seconds"] = time.perf_counter() - t0
            study.save(stage, payload)
            tracking.log_artifact(client, run_id, study.results)
        tracking.log_artifact(client, run_id, study.results)
        if failures:
            tracking.set_tags(client, run_id, {"segx.failed_stages": "; ".join(failures)[:4000]})
    print(
        f"segx bench: wrote {study.results / 'RESULTS.md'}"
        + (f"; {len(failures)} stage(s) failed" if failures else ""),
        flush=True,
    )
    if failures:
        raise SegxError("stage(s) failed: " + " | ".join(failures))
    return study.results / "RESULTS.md"


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="bench")
@cli.task
def _hydra_main(cfg: DictConfig) -> None:
    run_study(cfg)


def main() -> None:
    cli.run(_hydra_main, "bench")


if __name__ == "__main__":
    main()
