"""Multiruns, on any launcher (in one process, joblib, submitit, SLURM): each job records its
outcome, and the submitting process prints a summary at the end: which members finished,
which failed or were killed (and why), and the one command that reruns exactly those.

A failed member does not stop the sweep; a signal does (in one process). On SLURM, a job that is
preempted or reaches its time limit ends its MLflow run KILLED with its checkpoint kept; when
SLURM requeues it (submitit's checkpointing, or the cluster's own preemption requeue), the job
continues that run (``resume=auto``) instead of starting over.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import traceback
from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from segx import signals
from segx.errors import SegxError
from segx.workflows.hydra_job import is_multirun, launcher_config, requeued  # noqa: F401 - the sweep's API
from segx.workflows.member import MemberResult, train_member

RESULTS = "segx_results.jsonl"  # one line per job event, appended by the jobs themselves
JOBS = "segx_jobs.json"  # every job's overrides, written by the submitting process
_pending: dict[str, Any] = {}  # the sweep this process launched, until its summary is printed
_unfinished: list[int] = []  # per summary printed: its jobs that did not finish (the exit status)


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        signals.on_end(print_pending_summary)  # also when a launcher raises (a job SLURM killed)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = planned_jobs(list(config.hydra.overrides.task))
        _pending.update(dir=sweep_dir, jobs=jobs, command=_command(config))
        if jobs is not None:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            (sweep_dir / JOBS).write_text(json.dumps(jobs))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print_pending_summary()


def planned_jobs(task_overrides: Sequence[str]) -> list[list[str]] | None:
    """The overrides of every job the basic sweeper makes of these (None for other sweepers)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(task_overrides))
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # noqa: BLE001 - another sweeper's syntax: the results alone are summarised
        return None


def _command(config: DictConfig) -> str:
    """The command line of this sweep without its task overrides: the module and Hydra's own
    overrides (the launcher and its settings), which a rerun keeps."""
    kept = [o for o in config.hydra.overrides.hydra if not o.startswith(("hydra.mode=", "hydra.sweep.dir="))]
    return " ".join(["python -m segx.train -m", *map(shlex.quote, kept)])  # only segx.train sweeps


def print_pending_summary() -> None:
    """Print the summary of the sweep this process launched, once: at the sweep's end, or when a
    launcher raised because a job died without a result (SLURM killed it)."""
    if not _pending:
        return
    info = dict(_pending)
    _pending.clear()
    rows = read_results(info["dir"])
    for line in summary_lines(rows, info["jobs"], info["command"], info["dir"]):
        print(line, flush=True)
    outcomes = job_outcomes(rows, info["jobs"])
    _unfinished.append(sum(row["status"] != "FINISHED" for row in outcomes))


def unfinished_jobs() -> int:
    """How many jobs of the sweeps this process launched did not finish (FAILED, KILLED, LOST,
    NOT RUN), as their summaries counted them: ``segx.train -m`` then exits 1."""
    return sum(_unfinished)


def read_results(sweep_dir: Path) -> list[dict]:
    path = Path(sweep_dir) / RESULTS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a job killed mid-write: its other lines still count
    return rows


def job_outcomes(rows: list[dict], jobs: list[list[str]] | None) -> list[dict]:
    """The last event of each job, and a NOT RUN row for a planned job that never reported."""
    last: dict[int | str, dict] = {}
    for row in rows:  # by job number: a job's overrides come back normalised by Hydra (False, \:)
        last[row.get("job", json.dumps(row["overrides"]))] = row
    if jobs is None:
        return list(last.values())
    outcomes = []
    for number, overrides in enumerate(jobs):
        row = last.get(number)
        if row is None:
            row = {
                "overrides": list(overrides),
                "member": " ".join(overrides),
                "status": "NOT RUN",
                "error": "no result: the job did not start, or was killed before it began",
            }
        elif row["status"] == "STARTED":  # killed without a chance to say so (SIGKILL, node lost)
            row = {
                **row,
                "status": "LOST",
                "error": "started but never reported (killed by SIGKILL, "
                "out of memory, or its node went away); resume=auto continues it from its checkpoint",
            }
        outcomes.append(row)
    return outcomes


def rerun_commands(command: str, failed: list[list[str]]) -> list[str]:
    """Commands rerunning exactly these jobs, with ``resume=auto`` (a killed one continues from
    its checkpoint): one ``-m`` grid when the jobs form one, else one command per job."""
    if not failed:
        return []
    keys = [o.split("=", 1)[0] for o in failed[0]]
    if all([o.split("=", 1)[0] for o in job] == keys for job in failed):
        values = [list(dict.fromkeys(job[i].split("=", 1)[1] for job in failed)) for i in range(len(keys))]
        chosen = {tuple(o.split("=", 1)[1] for o in job) for job in failed}
        if set(product(*values)) == chosen:
            parts = [f"{k}={','.join(v)}" for k, v in zip(keys, values, strict=True)]
            return [" ".join([command, *map(shlex.quote, parts), "resume=auto"])]
    return [" ".join([command, *map(shlex.quote, job), "resume=auto"]) for job in failed]


def summary_lines(rows: list[dict], jobs: list[list[str]] | None, command: str, sweep_dir: Path) -> list[str]:
    outcomes = job_outcomes(rows, jobs)
    if not outcomes:
        return []
    varying = _varying(jobs or [row["overrides"] for row in outcomes])
    lines = ["", "segx sweep summary"]
    for row in outcomes:
        status = row["status"]
        detail = f"val/dice {row['val_dice']:.4f}" if status == "FINISHED" else row.get("error", "")
        run = f" run {row['run_id']}" if row.get("run_id") else ""
        name = " ".join(o for o in row["overrides"] if o in varying) or row["member"]
        lines.append(f"  {name:<36} {status:<9} {detail}{run}")
    failed = [row["overrides"] for row in outcomes if row["status"] != "FINISHED"]
    lines.append(
        f"  {len(outcomes) - len(failed)} finished, {len(failed)} failed (details in MLflow and {Path(sweep_dir) / RESULTS})"
    )
    reruns = rerun_commands(command, failed)
    if reruns:
        lines.append("  rerun exactly those:" if len(reruns) == 1 else "  rerun exactly those, one command each:")
        lines += [f"    {line}" for line in reruns]
    return lines


def _varying(jobs: list[list[str]]) -> set[str]:
    """The overrides that tell jobs apart (``backbone=resnet18 fold=1``), for the table."""
    return {o for job in jobs for o in job if sum(o in other for other in jobs) < len(jobs)}


def record_sweep_result(cfg: DictConfig, result: dict) -> None:
    from hydra.core.hydra_config import HydraConfig

    sweep_dir = Path(HydraConfig.get().sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runtime = HydraConfig.get()
    line = (
        json.dumps(
            {
                "job": runtime.job.num,
                "overrides": list(runtime.overrides.task),
                **result,
                "job_id": os.environ.get("SLURM_JOB_ID"),
            }
        )
        + "\n"
    )
    with open(sweep_dir / RESULTS, "a") as fh:  # one write of one short line: jobs append side by side
        fh.write(line)


def sweep_job(cfg: DictConfig) -> float:
    """One member of a multirun: a failure is reported and the sweep goes on; a signal stops it
    (and ends the run KILLED). A SLURM requeue continues the run it interrupted. Returns the
    member's best validation Dice (what a sweeper optimises)."""

    name = f"{cfg.backbone.name}-{cfg.arch.name}" + (f"-fold{cfg.fold}" if cfg.get("fold") is not None else "")
    if requeued() and cfg.get("resume") is None:
        with open_dict(cfg):
            cfg.resume = "auto"
        print(f"segx: {name}: requeued by SLURM (restart {os.environ['SLURM_RESTART_COUNT']}): resume=auto", flush=True)
    record_sweep_result(cfg, {"member": name, "status": "STARTED"})
    mark = signals.signal_count()
    started: list[str] = []  # the job's run, once train_member has one (named in every outcome)

    def run_id() -> str | None:
        return started[-1] if started else None

    try:
        with signals.signals_raise():  # SIGTERM (scancel, preemption) ends the run KILLED in any launcher
            result: MemberResult = train_member(cfg, on_run=started.append)
    except (KeyboardInterrupt, SystemExit) as exc:
        why = (
            "interrupted (SIGINT/SIGTERM)"
            if isinstance(exc, KeyboardInterrupt)
            else "stopped by sys.exit (submitit: preempted or timed out; requeued where SLURM allows)"
        )
        # SLURM follows a requeue with SIGTERM: it must not cut this line short.
        with signals.signals_deferred(), contextlib.suppress(KeyboardInterrupt):
            record_sweep_result(cfg, {"member": name, "status": "KILLED", "error": why, "run_id": run_id()})
        raise
    except Exception as exc:
        # A run created but not yet in its scope: FAILED, not RUNNING (the hook tracking registered).
        signals.run_failure_hooks("FAILED", f"{type(exc).__name__}: {exc}"[:5000])
        if signals.signal_since(mark) is not None:
            record_sweep_result(cfg, {"member": name, "status": "KILLED", "error": "interrupted", "run_id": run_id()})
            raise  # a library turned Ctrl-C/SIGTERM into an error: stop the sweep, not this job
        reason = str(exc) if isinstance(exc, SegxError) else f"{type(exc).__name__}: {exc}"
        print(f"segx: error: {name}: {reason}", file=sys.stderr, flush=True)
        if not isinstance(exc, SegxError):
            traceback.print_exc()
        record_sweep_result(cfg, {"member": name, "status": "FAILED", "error": reason[:500], "run_id": run_id()})
        return float("nan")
    record_sweep_result(
        cfg, {"member": name, "status": "FINISHED", "val_dice": result.best_val_dice, "run_id": result.run_id}
    )
    return result.best_val_dice
