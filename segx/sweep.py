"""Hydra callback: a summary table at the end of a multirun (which members failed, and why)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


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
