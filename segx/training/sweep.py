"""Multiruns: each job records its outcome, and a Hydra callback prints the summary table at the
end (which members failed, and why); a failed member does not stop the sweep, a signal does."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from segx import cli
from segx.errors import SegxError


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / "segx_results.jsonl"
        if not path.exists():
            return
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        print("\nsegx sweep summary", flush=True)
        for row in rows:
            detail = f"val/dice {row['val_dice']:.4f}" if row["status"] == "FINISHED" else row.get("error", "")
            print(f"  {row['member']:<28} {row['status']:<9} {detail}", flush=True)
        failed = sum(r["status"] != "FINISHED" for r in rows)
        print(f"  {len(rows) - failed} finished, {failed} failed (details in MLflow and {path})", flush=True)


def record_sweep_result(cfg: DictConfig, result: dict) -> None:
    from hydra.core.hydra_config import HydraConfig

    sweep_dir = Path(HydraConfig.get().sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / "segx_results.jsonl", "a") as fh:
        fh.write(json.dumps(result) + "\n")


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_job(cfg: DictConfig) -> float:
    """One member of a multirun: a failure is reported and the sweep goes on; a signal stops it."""
    name = f"{cfg.backbone.name}-{cfg.arch.name}"
    mark = cli.signal_count()
    try:
        from segx.training.member import train_member

        score = train_member(cfg)
    except Exception as exc:
        if cli.signal_since(mark) is not None:
            raise  # a library turned Ctrl-C/SIGTERM into an error: stop the sweep, not this job
        reason = str(exc) if isinstance(exc, SegxError) else f"{type(exc).__name__}: {exc}"
        print(f"segx: error: {name}: {reason}", file=sys.stderr, flush=True)
        if not isinstance(exc, SegxError):
            traceback.print_exc()
        record_sweep_result(cfg, {"member": name, "status": "FAILED", "error": reason[:500]})
        return float("nan")
    record_sweep_result(cfg, {"member": name, "status": "FINISHED", "val_dice": score})
    return score
